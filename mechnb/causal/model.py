"""High-level causal models: the hypothesis a causal abstraction tests against the network.

The problem: "layer 4 keeps the subject's gender" is a claim about a causal structure,
name -> gender -> pronoun, and about where the network computes one of its variables. A
`CausalModel` writes the structure down: variables with finite value sets, each variable's
parents, a mechanism computing it from them, and a template (or a function) that renders
the input variables as the network's input. It then answers the questions an experiment
needs: what the output is for an input (`run`), and what it would be if one variable took
the value it has on another input (`interchange`), the counterfactual an interchange
intervention on the network is scored against.

    >>> cm = CausalModel(
    ...     variables={"name": ["Mary", "John"], "gender": ["m", "f"], "pronoun": [" he", " she"]},
    ...     parents={"gender": ["name"], "pronoun": ["gender"]},
    ...     mechanisms={"gender": lambda name: {"Mary": "f", "John": "m"}[name],
    ...                 "pronoun": lambda gender: {"m": " he", "f": " she"}[gender]},
    ...     template="<|endoftext|>{name} walked because")
    >>> cm.run({"name": "Mary"})["pronoun"]
    ' she'
    >>> cm.interchange({"name": "Mary"}, {"gender": {"name": "John"}})["pronoun"]
    ' he'
    >>> data = cm.counterfactuals(64, intervene="gender", seed=0)   # mechnb.causal.Counterfactuals

Variables without parents are the inputs; the output is the one variable nothing reads
(or `output=`). Mechanisms take their parents' values positionally, in `parents` order.
This module is plain Python: no torch, no model.

Gotchas: a mechanism must return one of its variable's values (checked on every run, so
a typo in a table fails at once, naming the variable); a template names variables in
braces (`{name}`), and each field's place in the rendered text is what `@'{name}'`
resolves to in the network's tokens (`mechnb.causal.data`).
"""

from __future__ import annotations

import random
import string
from typing import Callable

from ..core.checks import as_list, is_int
from ..core.errors import CausalError


class CausalModel:
    """A finite causal model with a renderer of its inputs (see the module docstring).

    Args:
        variables: name -> the list of values it can take (finite, hashable).
        parents: name -> the variables its mechanism reads (none for the inputs).
        mechanisms: name -> a function of its parents' values (positional, in `parents`
            order), for every variable with parents.
        template: how an input setting becomes the network's input: a format string over
            variables (`"<|endoftext|>{name} walked because"`), or a function of the run's
            values (a dict) returning a prompt string, or a tensor for a plain torch module.
        output: the variable the network's answer is read as (default: the one variable no
            other reads).

    Raises a `CausalError` for a cycle, an unknown parent, a missing mechanism or a
    template field that is no variable. Example: see the module docstring.
    """

    def __init__(self, variables: dict, parents: dict | None = None, mechanisms: dict | None = None,
                 template: str | Callable | None = None, output: str | None = None):
        if not isinstance(variables, dict) or not variables:
            raise CausalError("variables must be a dict of name -> list of values, e.g. "
                              "{'name': ['Mary', 'John'], 'gender': ['m', 'f']}")
        self.values: dict[str, list] = {}
        for name, values in variables.items():
            listed = as_list(values) if not isinstance(values, str) else None
            if not isinstance(name, str) or not listed:
                raise CausalError(f"variable {name!r} needs a non-empty list of values, got {values!r:.60}")
            try:
                if len(set(listed)) != len(listed):
                    raise CausalError(f"variable {name!r} lists a value twice: each value once")
            except TypeError:
                raise CausalError(f"the values of {name!r} must be hashable (strings, numbers, tuples), "
                                  f"got {listed!r:.60}") from None
            self.values[name] = listed
        self.parents: dict[str, list[str]] = {name: [] for name in self.values}
        for name, read in (parents or {}).items():
            self._known(name, "parents")
            read = as_list(read) or []
            for parent in read:
                self._known(parent, f"the parents of {name!r}")
            self.parents[name] = list(read)
        self.mechanisms: dict[str, Callable] = dict(mechanisms or {})
        for name, mechanism in self.mechanisms.items():
            self._known(name, "mechanisms")
            if not callable(mechanism):
                raise CausalError(f"the mechanism of {name!r} must be a function of its parents, "
                                  f"got {type(mechanism).__name__}")
            if not self.parents[name]:
                raise CausalError(f"{name!r} has a mechanism but no parents: inputs take their values "
                                  f"from the setting; give parents={{{name!r}: [...]}}, or drop its mechanism")
        missing = [name for name, read in self.parents.items() if read and name not in self.mechanisms]
        if missing:
            raise CausalError(f"{', '.join(map(repr, missing))} {'has' if len(missing) == 1 else 'have'} parents "
                              "but no mechanism: give mechanisms={name: function of the parents}")
        self.order = self._topological()
        self.inputs = [name for name in self.order if not self.parents[name]]
        readers = {parent for read in self.parents.values() for parent in read}
        if output is None:
            sinks = [name for name in self.order if name not in readers and self.parents[name]]
            if len(sinks) != 1:
                raise CausalError(f"the model has {len(sinks)} outputs ({', '.join(sinks) or 'none'}): name the "
                                  "variable the network's answer is read as, output=...")
            output = sinks[0]
        self._known(output, "output")
        self.output = output
        self.template = template
        if isinstance(template, str):
            for field in self.fields:
                self._known(field, "the template's fields")
        elif template is not None and not callable(template):
            raise CausalError(f"template must be a format string such as '{{name}} walked because' or a "
                              f"function of the values, got {type(template).__name__}")

    def __repr__(self) -> str:
        edges = "; ".join(f"{', '.join(read)} -> {name}" for name, read in self.parents.items() if read)
        return (f"<mechnb.causal.CausalModel: inputs {', '.join(self.inputs)}; output {self.output}; "
                f"{edges}>")

    def _known(self, name, where: str) -> None:
        if name not in self.values:
            raise CausalError(f"{name!r} in {where} is not a variable: the variables are "
                              f"{', '.join(self.values)}")

    def _topological(self) -> list[str]:
        """The variables with every parent before its children; a `CausalError` naming a cycle."""
        order, state = [], {}

        def visit(name, path):
            if state.get(name) == "done":
                return
            if state.get(name) == "open":
                cycle = path[path.index(name):] + [name]
                raise CausalError(f"the causal model has a cycle, {' -> '.join(reversed(cycle))}: a causal "
                                  "model is acyclic; remove one of these parent links")
            state[name] = "open"
            for parent in self.parents[name]:
                visit(parent, path + [name])
            state[name] = "done"
            order.append(name)

        for name in self.values:
            visit(name, [])
        return order

    @property
    def variables(self) -> list[str]:
        """Every variable, parents before children."""
        return list(self.order)

    @property
    def fields(self) -> list[str]:
        """The variables a template string names, in order (none for a function)."""
        if not isinstance(self.template, str):
            return []
        return [field for _, field, _, _ in string.Formatter().parse(self.template) if field]

    def run(self, setting: dict, intervention: dict | None = None) -> dict:
        """Every variable's value for an input `setting` (input -> value), with the variables in
        `intervention` (name -> value) held at the given values instead of their mechanism's.

        Returns a dict, variable -> value. Example: `cm.run({"name": "Mary"})["pronoun"]`.
        """
        intervention = intervention or {}
        for name, value in intervention.items():
            self._known(name, "the intervention")
            self._check(name, value, "the intervention")
        values = {}
        for name in self.order:
            if name in intervention:
                values[name] = intervention[name]
            elif not self.parents[name]:
                if not isinstance(setting, dict) or name not in setting:
                    raise CausalError(f"the setting {setting!r:.80} lacks input {name!r}: give every input "
                                      f"({', '.join(self.inputs)})")
                values[name] = self._check(name, setting[name], "the setting")
            else:
                value = self.mechanisms[name](*[values[parent] for parent in self.parents[name]])
                values[name] = self._check(name, value, f"the mechanism of {name!r}",
                                           {parent: values[parent] for parent in self.parents[name]})
        return values

    def _check(self, name: str, value, where: str, given: dict | None = None):
        try:
            known = value in self.values[name]
        except TypeError:
            known = False
        if not known:
            shown = ", ".join(map(repr, self.values[name][:8])) + (" ..." if len(self.values[name]) > 8 else "")
            context = f" on {given}" if given else ""
            raise CausalError(f"{where} gives {name} = {value!r}{context}, which is not one of its values "
                              f"({shown}): fix the mechanism, or add the value to variables[{name!r}]")
        return value

    def interchange(self, base: dict, sources: dict) -> dict:
        """The run of `base` with each variable in `sources` (name -> an input setting) taking the
        value it has in the run of that source: the counterfactual an interchange intervention
        on the network should reproduce. Returns every variable's value, as `run` does.

        Example: `cm.interchange({"name": "Mary"}, {"gender": {"name": "John"}})["pronoun"]`.
        """
        if not isinstance(sources, dict) or not sources:
            raise CausalError("interchange takes the base setting and {variable: source setting}, e.g. "
                              "cm.interchange(base, {'gender': source})")
        held = {}
        for name, source in sources.items():
            self._known(name, "the interchange")
            held[name] = self.run(source)[name]
        return self.run(base, held)

    def render(self, values: dict):
        """The network's input for a run's `values`, and each template field's character span:
        `(prompt, {field: (start, end)})` (spans empty when a function renders)."""
        if self.template is None:
            raise CausalError("this causal model has no template: give template='... {name} ...' or a function "
                              "of the values that returns the prompt")
        if callable(self.template):
            made = self.template(dict(values))
            return made, {}
        text, spans = "", {}
        for literal, field, spec, conversion in string.Formatter().parse(self.template):
            text += literal
            if field:
                piece = format(values[field], spec or "")
                spans[field] = (len(text), len(text) + len(piece))
                text += piece
        return text, spans

    def sample(self, rng: random.Random) -> dict:
        """An input setting drawn uniformly, each input independently."""
        return {name: rng.choice(self.values[name]) for name in self.inputs}

    def counterfactuals(self, n: int, intervene, seed: int = 0, changes: bool = True, tries: int = 1000):
        """A seeded counterfactual dataset: `n` bases, each with one source per intervened
        variable, balanced over the output's counterfactual values.

        Args:
            n: examples.
            intervene: the variable whose value the sources supply, or a list of them (a
                multi-variable interchange: one source each).
            seed: the seed of the draws (the same seed, the same data).
            changes: draw only pairs whose interchange changes the output (a pair that
                changes nothing scores the base's own answer, not the variable).
            tries: draws per example before giving up (a `CausalError` says what is impossible).

        Returns a `mechnb.causal.Counterfactuals`. Example: `cm.counterfactuals(512, "gender")`.
        """
        from .data import Counterfactuals, Example

        if not is_int(n) or n < 1:
            raise CausalError(f"n, the number of examples, must be a positive int, got {n!r}")
        names = as_list(intervene)
        if not names:
            raise CausalError("intervene names the variable (or variables) the sources supply, e.g. intervene='gender'")
        for name in names:
            self._known(name, "intervene")
            if name == self.output and len(names) == 1 and not self.parents[name]:
                raise CausalError(f"{name!r} is an input and the output: intervening on it is the source's run")
        rng = random.Random(seed)
        outputs = self.values[self.output]
        examples = []
        for index in range(n):
            wanted = outputs[index % len(outputs)]  # balanced over the counterfactual outputs
            for _ in range(tries):
                base = self.sample(rng)
                sources = {name: self.sample(rng) for name in names}
                expected = self.interchange(base, sources)[self.output]
                if expected != wanted:
                    continue
                if changes and expected == self.run(base)[self.output]:
                    continue
                examples.append(Example(base, sources))
                break
            else:
                why = " that change the output" if changes else ""
                raise CausalError(f"no draw in {tries} gave a pair{why} whose counterfactual {self.output} is "
                                  f"{wanted!r}: intervening on {', '.join(names)} cannot change {self.output} "
                                  "here (check the mechanisms), or pass changes=False")
        return Counterfactuals(self, examples, names, meta={"seed": seed, "changes": changes})
