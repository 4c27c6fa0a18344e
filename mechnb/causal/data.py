"""Counterfactual datasets: bases, the sources that supply a variable, and what should happen.

An interchange intervention runs the network on a base input with one internal value taken
from its run on a source input. The causal model says what the output should then be: the
base's run with the aligned variable set to the value it has on the source. A
`Counterfactuals` holds such examples (a base setting, one source setting per intervened
variable) with the causal model that scores them, renders them as prompts, finds each
template field's tokens, and keeps only what a model gets right:

    >>> data = cm.counterfactuals(512, intervene="gender", seed=0)
    >>> data = data.filter(model)         # prints how many it dropped, and why
    >>> data.df.head()                    # base, source, prompts, base output, expected
    >>> train, test = data.split(0.2, seed=0)
    >>> data.positions(model, "resid_post.4@'{name}'")     # base/source position pairs

Positions: `@'{name}'` is the last token of field `name` in each prompt, found from the
tokenizer's character offsets, for the base and for the source separately (a two-token
name moves every later position). Numbers and `@-1` count each prompt's own tokens.

Answers: on a language model each output value is a string whose first token is the answer
(`" she"`); on an image classifier a class name; on a plain torch module the value's index
in the output variable's list is the class index the module's output is read at. A
prediction is the answer with the largest logit among the output's values
(`compare="values"`, the default), or the model's top token (`compare="top1"`).

Gotchas: examples are keyed by their input settings, so a setting shared by many examples
is rendered, tokenized and run once. A pair whose interchange leaves the output as it is
measures nothing: `unchanged` counts them, and methods warn about them
(`CounterfactualWarning`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..core.checks import is_int
from ..core.errors import CausalError, SiteError

@dataclass
class Example:
    """One counterfactual example: the base input setting, and a source setting per variable."""

    base: dict
    sources: dict


def key(setting: dict) -> tuple:
    """A setting as a hashable key (its items, sorted by name)."""
    return tuple(sorted(setting.items()))


@dataclass
class Rendered:
    """The distinct input settings of a dataset rendered for one model: `inputs` (prompts, or
    tensors for a plain module), `fields` (per input, field -> its token positions), `index`
    (setting key -> position in these lists)."""

    inputs: list
    fields: list
    index: dict = field(default_factory=dict)

    def of(self, setting: dict) -> int:
        return self.index[key(setting)]


class Counterfactuals:
    """Examples with their causal model (see the module docstring).

    Args:
        causal_model: the `CausalModel` that scores them.
        examples: `Example`s; every source names a variable of `variables`.
        variables: the intervened variables, one source each, in order.
        meta: facts about how they were made (seed, filter counts).
    """

    def __init__(self, causal_model, examples: list, variables: list, meta: dict | None = None):
        self.causal_model = causal_model
        self.examples = list(examples)
        self.variables = list(variables)
        self.meta = dict(meta or {})
        self.model = None  # the model `filter` kept these for, if any
        self._rendered: dict = {}
        for example in self.examples:
            if set(example.sources) != set(self.variables):
                raise CausalError(f"an example has sources for {sorted(example.sources)}, not for the dataset's "
                                  f"variables {self.variables}: give one source per intervened variable")

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._subset(range(len(self))[index])
        return self.examples[index]

    def __repr__(self) -> str:
        dropped = self.meta.get("filter", {}).get("dropped")
        kept = f", {dropped} dropped by the filter" if dropped is not None else ""
        return (f"<mechnb.causal.Counterfactuals: {len(self)} examples, interchanging "
                f"{', '.join(self.variables)} (output {self.causal_model.output}){kept}>")

    def _subset(self, indices, **meta) -> "Counterfactuals":
        made = Counterfactuals(self.causal_model, [self.examples[i] for i in indices], self.variables,
                               {**self.meta, **meta})
        made.model, made._rendered = self.model, self._rendered
        return made

    # -- what the causal model says ---------------------------------------------------

    def variable(self, variable=None) -> list[str]:
        """The intervened variables an alignment names (`None`: all of them), checked."""
        if variable is None:
            return list(self.variables)
        names = [variable] if isinstance(variable, str) else list(variable)
        for name in names:
            if name not in self.variables:
                raise CausalError(f"these counterfactuals interchange {', '.join(self.variables)}, not {name!r}: "
                                  f"make them with cm.counterfactuals(n, intervene={name!r})")
        return names

    def expected(self, variables=None) -> list:
        """The output value of each example under the interchange of `variables` (default all)."""
        names = self.variable(variables)
        cm = self.causal_model
        return [cm.interchange(e.base, {name: e.sources[name] for name in names})[cm.output]
                for e in self.examples]

    def base_outputs(self) -> list:
        """The output value of each base on its own."""
        return [self.causal_model.run(e.base)[self.causal_model.output] for e in self.examples]

    def unchanged(self, variables=None) -> list[int]:
        """Indices of the examples whose interchange leaves the output as the base's."""
        return [i for i, (a, b) in enumerate(zip(self.expected(variables), self.base_outputs())) if a == b]

    @property
    def df(self):
        """One row per example: base and source settings, prompts, base output, expected output."""
        import pandas as pd

        rows = []
        cm = self.causal_model
        expected = self.expected()
        for example, base_output, wanted in zip(self.examples, self.base_outputs(), expected):
            row = {"base": _text(example.base)}
            for name in self.variables:
                row[f"source ({name})" if len(self.variables) > 1 else "source"] = _text(example.sources[name])
            if isinstance(cm.template, str) or cm.template is None:
                row["base prompt"] = cm.render(cm.run(example.base))[0] if cm.template else ""
            row["base output"], row["expected"] = base_output, wanted
            rows.append(row)
        return pd.DataFrame(rows)

    def split(self, test: float = 0.2, seed: int = 0):
        """`(train, test)`: a seeded random split, `test` the held-out share (0-1) or count."""
        n = len(self)
        count = test if is_int(test) else round(float(test) * n) if isinstance(test, float) else None
        if count is None or not 0 < count < n:
            raise CausalError(f"test must be a share between 0 and 1 or a count between 1 and {n - 1} "
                              f"(this dataset has {n} examples), got {test!r}")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held = sorted(order[:count])
        kept = sorted(order[count:])
        return self._subset(kept, split="train"), self._subset(held, split="test")

    # -- rendered for a model ---------------------------------------------------------

    def settings(self) -> list[dict]:
        """The distinct input settings of bases and sources, in first-seen order."""
        seen = {}
        for example in self.examples:
            for setting in (example.base, *example.sources.values()):
                seen.setdefault(key(setting), setting)
        return list(seen.values())

    def rendered(self, model) -> Rendered:
        """Every distinct setting rendered for `model`: its input and its fields' token positions."""
        reader = model.tokenizer
        cached = self._rendered.get(id(reader))
        wanted = self.settings()
        if cached is not None and all(key(s) in cached.index for s in wanted):
            return cached
        cm = self.causal_model
        inputs, fields, index = [], [], {}
        for setting in wanted:
            made, spans = cm.render(cm.run(setting))
            index[key(setting)] = len(inputs)
            inputs.append(made)
            fields.append(token_fields(reader, made, spans) if isinstance(made, str) and spans else {})
        _check_inputs(model, inputs)
        rendered = Rendered(inputs, fields, index)
        self._rendered[id(reader)] = rendered
        return rendered

    def positions(self, model, site) -> "pandas.DataFrame":
        """The base and source positions a site names in each example, as a DataFrame (`example`,
        `variable`, `base_token`, `base_pos`, `source_token`, `source_pos`): how positions line
        up when base and source differ in length."""
        import pandas as pd

        from ..core.sites import parse

        parsed = parse(site)
        rendered = self.rendered(model)
        tokens = _tokens(model, rendered)
        rows = []
        for number, example in enumerate(self.examples):
            base = rendered.of(example.base)
            for name in self.variables:
                source = rendered.of(example.sources[name])
                base_at = resolve(parsed, tokens, rendered.fields, [base])[0]
                source_at = resolve(parsed, tokens, rendered.fields, [source])[0]
                rows.append({"example": number, "variable": name,
                             "base_token": " ".join(repr(tokens[base][p]) for p in base_at) if tokens else "",
                             "base_pos": base_at, "source_pos": source_at,
                             "source_token": " ".join(repr(tokens[source][p]) for p in source_at) if tokens else ""})
        return pd.DataFrame(rows, columns=["example", "variable", "base_token", "base_pos", "source_token",
                                           "source_pos"])

    # -- what the model gets right --------------------------------------------------------

    def filter(self, model, compare: str = "values", batch_size: int | None = None,
               quiet: bool = False) -> "Counterfactuals":
        """The examples `model` gets right on the base and on every source (the causal model's
        output, read as `compare` says). Prints one line saying how many it dropped and why
        (`quiet=True`: none); a `CausalError` if none is left.

        Returns a new `Counterfactuals` remembering the model (`.model`).
        """
        from .answers import predictions

        cm = self.causal_model
        rendered = self.rendered(model)
        predicted = predictions(model, cm, rendered.inputs, compare, batch_size)
        truth = {key(s): cm.run(s)[cm.output] for s in self.settings()}
        right = {k: predicted[i] == truth[k] for k, i in rendered.index.items()}
        kept, wrong_base, wrong_source = [], 0, 0
        for number, example in enumerate(self.examples):
            base_ok = right[key(example.base)]
            source_ok = all(right[key(s)] for s in example.sources.values())
            wrong_base += not base_ok
            wrong_source += base_ok and not source_ok
            if base_ok and source_ok:
                kept.append(number)
        dropped = len(self) - len(kept)
        share = sum(right.values()) / max(len(right), 1)
        if not kept:
            raise CausalError(f"{model.name} gets none of the {len(self)} examples right (its accuracy on their "
                              f"{len(right)} distinct inputs is {share:.0%}): nothing is left to intervene on; check "
                              "the template and the output values, or use a model that does the task")
        made = self._subset(kept, filter={"kept": len(kept), "dropped": dropped, "wrong base": wrong_base,
                                          "wrong source": wrong_source, "accuracy": share, "compare": compare})
        made.model = model
        if not quiet:
            print(f"kept {len(kept)} of {len(self)} examples: dropped {dropped} ({wrong_base} with the base wrong, "
                  f"{wrong_source} with a source wrong); {model.name} gets {share:.1%} of the "
                  f"{len(right)} distinct inputs right")
        return made


def resolve(site, tokens: list | None, fields: list, which) -> list:
    """The positions `site` names in each rendered input of `which` (None: the whole value)."""
    if site.positions is None:
        return [None] * len(which)
    if tokens is None:
        raise CausalError(f"{site}: a plain module's inputs have no tokens to count positions in; name the "
                          f"module's value without @ ({site.name})")
    found = []
    for index in which:
        try:
            found.append(site.positions.resolve([tokens[index]], [fields[index]])[0].tolist())
        except SiteError as problem:
            raise CausalError(f"{site} in the input {''.join(tokens[index])!r}: {problem}") from None
    return found


def token_fields(tokenizer, prompt: str, spans: dict) -> dict:
    """Each field's token positions in `prompt` (the tokens its character span overlaps)."""
    try:
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    found = {}
    for name, (start, end) in spans.items():
        if offsets is not None:
            found[name] = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        else:  # a slow tokenizer: count the tokens before and through the field
            before = len(tokenizer(prompt[:start])["input_ids"]) if start else 0
            through = len(tokenizer(prompt[:end])["input_ids"])
            found[name] = list(range(before, through))
    return found


def _tokens(model, rendered: Rendered) -> list | None:
    """Each rendered prompt's token strings (None for tensors)."""
    if not rendered.inputs or not isinstance(rendered.inputs[0], str):
        return None
    from ..core.batch import Batch

    return [Batch.of(model.tokenizer, prompt).tokens[0] for prompt in rendered.inputs]


def _check_inputs(model, inputs: list) -> None:
    """A `CausalError` when the rendered inputs do not suit the model (text for a plain module)."""
    import torch

    tensors = [torch.is_tensor(x) for x in inputs]
    if model.is_plain or model.reads_images:
        if not all(tensors):
            raise CausalError(f"{model.name} reads tensors, and the causal model renders text: give template= a "
                              "function of the values that returns the input tensor")
    elif any(tensors) or not all(isinstance(x, str) and x for x in inputs):
        raise CausalError(f"{model.name} reads text: the template must render every setting as a non-empty string")


def _text(setting: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in setting.items())
