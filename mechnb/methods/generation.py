"""Generation under interventions: see what an ablation, a hook, a steering vector, an
attached SAE or transcoder set, or a weight edit does to the text the model writes.

    >>> model.steer("resid_pre.12", v, scale=8)
    >>> model.generate("I think the movie was", max_new_tokens=20, compare=True).df
    >>> result = model.generate(prompts, sites=["resid_post.12", "sae.12"])
    >>> result.activations["resid_post.12"]          # row token d_model: one per new token

The mechanism. The prompts run once, left-padded as transformers' `generate` pads them
(the padding masked, position ids counted over real tokens), and fill the model's
key/value cache; each step then computes only each row's newest token. Every active
intervention is a PyTorch hook on its module (`mechnb.core.interventions`), so it acts
in each of these forwards, and each forward's context says which absolute position a
row's columns hold (`Context.offset`, one per row), so that positions keep the meaning
they have in nnsight's and TransformerLens's generation:

- `@-1` is the newest token: each prompt's last token in the prompts' forward, then each
  generated token once, in the step that computes it;
- `@3:7`, `@5`, `@'John'` name absolute positions of the sequence so far; an intervention
  acts on those the running forward computes, so a prompt span is changed once, in the
  prompts' forward, and its changed keys and values stay in the cache;
- no positions: every position, each in the forward that computes it;
- a hook function receives the part of its site the forward computes (`batch 1 d_model`
  in a step). Weight edits are in the weights, so they hold under the cache as they are.

`cache=False` keeps whole-sequence semantics: each step is a forward of the whole
sequence so far (prompt and generated tokens, right-padded), in which `@-1` is only the
last token, so earlier generated tokens are recomputed without it. Interventions that
do not single out the newest token (ablations, hooks of every position, SAEs,
transcoders, prompt spans) give the same text either way; `cache=False` costs a forward
of the whole sequence per step (quadratic in the length), the cache one token per row.

A row's results do not depend on the other rows of its batch (their padding is masked,
and its positions count its own tokens). `compare=True` puts each prompt in the batch
twice and switches interventions off in the second copy (`Context.active`), so both
continuations come from one batched run.

`sites=` keeps, for every generated token, the value of each site at that token's
position, as the forward that computed it left it (after the interventions there):
`result.activations` is a `mechnb.core.cache.Cache` over the generated tokens, looked up
like `model.cache`'s (`["resid_post.12"]` is `row token d_model`, `["sae.12"]` is
`row token feature`, `["resid_post.12@-1"]` each row's last new token). The last token
chosen is fed once more so that its values exist. Many prompts run in chunks of
`batch_size` (`mechnb.core.memory.Chunks`), each chunk's values moving to CPU as it ends.

Greedy decoding (the default) equals transformers' `generate(do_sample=False)` token
for token; sampling (`do_sample=True`, `temperature`, `top_p`) draws prompt `i`'s tokens
from a generator seeded `seed + i`, so a `seed` reproduces a continuation whatever the
batch, and a prompt's copy under `compare` draws the same numbers. Rows stop at the
end-of-sequence token.

Gotchas: an intervention on `logits` does not act here (generation unembeds each row's
newest position itself); a resample ablation draws by the shape of the forward's value,
so the cached steps draw other values than whole-sequence forwards; `pattern` sites
cannot be kept (their key axis grows with each token: keep `head.L`).
"""

from __future__ import annotations

import html as html_module
import time

import torch

from ..core.arch import submodule
from ..core.batch import Batch, check_length
from ..core.checks import as_list, is_int
from ..core.engine import run, unembed_normed
from ..core.errors import GenerationError
from ..core.model import language_only
from ..core.remote import local_only
from ..display.results import Result


@local_only
@language_only
def generate(model, prompts, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, compare: bool = False, stream=None,
             cache: bool = True, sites=None, batch_size=None) -> Result:
    """Continue prompts with every active intervention applied as each token is computed.

    Args:
        prompts: a prompt or a list of them (one batch).
        max_new_tokens: tokens to add (rows stop early at end-of-sequence).
        do_sample, temperature, top_p, seed: greedy by default; sampling draws from
            softmax(logits / temperature) cut to the top_p mass, prompt `i` from a
            generator seeded `seed + i`.
        compare: each prompt also without interventions, in the same batch.
        stream: True shows continuations as they grow; a function receives the list
            of texts after each step.
        cache: True (default) runs the prompts once and then one token per row and step
            through the key/value cache, interventions acting on each position when it is
            computed (`@-1`: each new token); False recomputes the whole sequence at every
            step (`@-1`: the last token of each such forward). See the module docstring.
        sites: a site or list of sites (`"resid_post.12"`, `"sae.12"`, `"head.3.*"`) whose
            values to keep at every generated token; `pattern` sites are refused.
        batch_size: prompts generated at once (default all); a `Chunks` is shared.

    Returns:
        A `Result`: `.values` token ids `row token` (-1 padded); `.df` with `prompt`,
        `interventions`, `continuation`, `n_tokens`; `.activations` (with `sites`) a
        `Cache` whose lookups are `row token ...`, the value at each generated token (0
        past a row's end; `.activations.lengths` gives each row's count), else None.
        Rows are the prompts, then (with `compare`) the same prompts without interventions.
        Example: `model.generate("The Eiffel Tower is in", max_new_tokens=10).df.continuation[0]`.
    """
    from ..core.memory import Chunks

    start_time = time.perf_counter()
    prompts = as_list(prompts) or []
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise GenerationError("generate takes a prompt or a list of non-empty prompt strings")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (temperature, top_p))
    if not numbers or not temperature > 0 or not 0 < top_p <= 1:
        raise GenerationError(f"temperature must be > 0 and top_p in (0, 1], got {temperature!r}, {top_p!r}")
    if seed is not None and (not is_int(seed)):
        raise GenerationError(f"seed must be an integer or None, got {seed!r}")
    if not isinstance(cache, bool):
        raise GenerationError(f"cache must be True (the key/value cache) or False (recompute every step), "
                              f"got {cache!r}")
    kept = _kept_sites(model, sites)
    tokenizer = model.tokenizer
    n = len(prompts)
    rows = prompts * 2 if compare else prompts
    active = [True] * n + [False] * n if compare else None
    first = Batch.of(tokenizer, rows)
    check_length(model, max(first.lengths) + max_new_tokens, "the longest prompt with max_new_tokens")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
    show = _Stream(stream, rows, active) if stream else None
    generated: list[list[int]] = [[] for _ in rows]
    values: dict[str, list] = {site.name: [None] * len(rows) for site in kept}
    chunks = batch_size if isinstance(batch_size, Chunks) else Chunks(
        batch_size, "generation", "prompts", advice="keep fewer sites, or generate fewer tokens")

    def one_chunk(indices):
        members = list(indices) + ([n + i for i in indices] if compare else [])

        def shown(texts):
            for row, tokens in zip(members, texts):
                generated[row] = tokens
            show.update(tokenizer, generated)

        generators = None if seed is None or not do_sample else \
            [torch.Generator().manual_seed(seed + (row % n)) for row in members]
        switched = None if active is None else [active[r] for r in members]
        return members, _continue(model, first.select(members), switched, settings, generators, kept, cache,
                                  shown if show is not None else None)

    for _, (members, (tokens, captured)) in chunks.run(one_chunk, range(n)):
        for position, row in enumerate(members):
            generated[row] = tokens[position]
            for name in values:
                values[name][row] = captured[name][position].cpu()
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    width = max(len(g) for g in generated)
    token_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, g in enumerate(generated):
        token_ids[i, :len(g)] = torch.tensor(g, dtype=torch.long)
    import pandas as pd

    df = pd.DataFrame({"prompt": rows, "interventions": [("on" if a else "off") for a in active] if compare
                       else ["on" if model.interventions else "none"] * len(rows),
                       "continuation": texts, "n_tokens": [len(g) for g in generated]})
    meta = {"title": f"generation, {max_new_tokens} new tokens", "prompts": prompts, "compare": compare,
            "do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed, "cache": cache,
            "sites": [site.name for site in kept],
            "interventions": [repr(i) for i in model.interventions], "model": model.name,
            "axes": ["row", "token"], "seconds": round(time.perf_counter() - start_time, 3)}
    result = Result(token_ids, df, meta, html=lambda result: _table(result.df))
    result.activations = None
    if kept:
        from ..core.cache import Cache

        result.activations = Cache(model, Batch.of_ids(tokenizer, generated),
                                   {name: torch.stack(_padded(per_row, width)) for name, per_row in values.items()})
    return result


def _kept_sites(model, sites) -> list:
    """The whole sites `sites=` names, checked, in execution order."""
    from ..core.sites import Site, parse

    if sites is None:
        return []
    wanted = [sites] if isinstance(sites, (str, Site)) else as_list(sites)
    if not wanted:
        raise GenerationError(f"sites takes a site or a list of sites, e.g. sites=['resid_post.5'], got {sites!r:.40}")
    whole = {}
    for site in wanted:
        for concrete in parse(site).expand(model):
            if concrete.kind == "pattern":
                raise GenerationError(f"generate cannot keep {site}: a pattern's key axis grows with every "
                                      f"token; keep head.{concrete.layer} instead, or model.cache the final sequences")
            whole[concrete.base.name] = concrete.base
    return sorted(whole.values(), key=lambda s: s.order)


def _padded(per_row: list, width: int) -> list:
    """Each row's `token ...` values padded with zeros to `width` tokens."""
    return [torch.cat([v, v.new_zeros((width - len(v), *v.shape[1:]))]) for v in per_row]


def _continue(model, batch: Batch, active, settings: dict, generators, kept: list, cached: bool, shown):
    """Generate for one chunk of rows: each row's new token ids, and each kept site's
    values `token ...` per row."""
    steps = (_CachedSteps if cached else _WholeSteps)(model, batch, active)
    generated: list[list[int]] = [[] for _ in range(len(batch))]
    done = [False] * len(batch)
    store = {site.name: [] for site in kept}
    eos = model.tokenizer.eos_token_id
    # The capture hooks live for the whole generation and go when it ends, however it ends.
    with run(model, grad=False) as outer:
        for site in kept:
            if site.kind != "logits":
                outer.hook_site(site, lambda value, name=site.name: store[name].append(steps.newest(value))
                                if steps.keeping else None)

        def fed_forward():
            """The forward of the tokens chosen last, keeping its values."""
            steps.keeping = bool(kept)
            logits = steps.forward()
            if "logits" in store:
                store["logits"].append(logits)
            return logits

        logits = steps.forward()
        for step in range(settings["max_new_tokens"]):
            chosen = _choose(logits, settings["do_sample"], settings["temperature"], settings["top_p"],
                             generators).tolist()
            finished = list(done)
            for i, token in enumerate(chosen):
                if not done[i]:
                    generated[i].append(token)
                    done[i] = token == eos
            if shown is not None:
                shown(generated)
            steps.append(chosen, finished)
            if all(done) or step == settings["max_new_tokens"] - 1:
                break
            logits = fed_forward()
        if kept:
            fed_forward()  # the tokens chosen last have values only once fed
    captured = {}
    for name, values in store.items():
        stacked = torch.stack(values, 1)  # row token ...
        captured[name] = [stacked[i, :len(g)] for i, g in enumerate(generated)]
    return generated, captured


class _Steps:
    """The forwards of one generation: the prompts first, then one per chosen token.

    `forward()` returns each row's logits at its newest token (`batch vocab`, float32 on
    CPU); `append(chosen, finished)` adds the chosen tokens; `newest(value)` picks each
    row's newest position out of a site's whole value; `keeping` says whether the capture
    hooks keep this forward's values.
    """

    def __init__(self, model, batch: Batch, active):
        self.model, self.active, self.keeping = model, active, False
        self.sequences = [batch.input_ids[i, :n].tolist() for i, n in enumerate(batch.lengths)]
        self.tokens = [list(t) for t in batch.tokens]
        self.base = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
        self.pad = next(t for t in (model.tokenizer.pad_token_id, model.tokenizer.eos_token_id, 0) if t is not None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return unembed_normed(self.model, hidden).float().cpu()


class _CachedSteps(_Steps):
    """Left-padded prompts into the key/value cache, then one new token per row and step."""

    def __init__(self, model, batch: Batch, active):
        super().__init__(model, batch, active)
        self.past = None
        width = max(batch.lengths)
        self.mask = torch.zeros((len(batch), width), dtype=torch.long)
        self.ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        for i, sequence in enumerate(self.sequences):
            self.ids[i, width - len(sequence):] = torch.tensor(sequence)
            self.mask[i, width - len(sequence):] = 1
        # Column 0 of row i holds position -(its padding): positions resolve per row.
        self.offset = [len(s) - width for s in self.sequences]
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)

    def forward(self) -> torch.Tensor:
        device = self.model.device
        with run(self.model, self.tokens, offset=self.offset, active=self.active):
            out = self.base(input_ids=self.ids.to(device), attention_mask=self.mask.to(device),
                            position_ids=self.positions.to(device), cache=self.past, use_cache=True)
        self.past = out.cache
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return self.logits(hidden[:, -1])

    def append(self, chosen: list[int], finished: list[bool]) -> None:
        # Finished rows are fed padding: the batch steps together, their outputs unused.
        fed = [self.pad if end else token for token, end in zip(chosen, finished)]
        for sequence, tokens, token in zip(self.sequences, self.tokens, fed):
            sequence.append(token)
            tokens.append(self.model.tokenizer.decode([token]))
        self.ids = torch.tensor(fed, dtype=torch.long)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(fed), 1))], 1)
        self.offset = [len(s) - 1 for s in self.sequences]
        self.positions = torch.tensor(self.offset, dtype=torch.long)[:, None]

    def newest(self, value: torch.Tensor) -> torch.Tensor:
        return value[:, -1].clone()


class _WholeSteps(_Steps):
    """Every step a forward of each row's whole sequence so far, right-padded."""

    def forward(self) -> torch.Tensor:
        width = max(len(s) for s in self.sequences)
        ids = torch.full((len(self.sequences), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, sequence in enumerate(self.sequences):
            ids[i, :len(sequence)] = torch.tensor(sequence)
            mask[i, :len(sequence)] = 1
        self.last = torch.tensor([len(s) - 1 for s in self.sequences])
        device = self.model.device
        with run(self.model, self.tokens, active=self.active):
            out = self.base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return self.logits(hidden[torch.arange(len(ids)), self.last.to(hidden.device)])

    def append(self, chosen: list[int], finished: list[bool]) -> None:
        # A finished row stops growing: its sequence is what it generated.
        for sequence, tokens, token, end in zip(self.sequences, self.tokens, chosen, finished):
            if not end:
                sequence.append(token)
                tokens.append(self.model.tokenizer.decode([token]))

    def newest(self, value: torch.Tensor) -> torch.Tensor:
        return value[torch.arange(value.shape[0]), self.last.to(value.device)]


def _choose(logits, do_sample: bool, temperature: float, top_p: float, generators) -> torch.Tensor:
    """The next token of each row: argmax, or a draw (each row from its own generator, if
    given) from the tempered, nucleus-cut softmax."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        ordered, order = probs.sort(-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        outside = ordered.cumsum(-1) - ordered > top_p
        ordered = ordered.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    probs = probs / probs.sum(-1, keepdim=True)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _table(df) -> str:
    """Prompt and continuation per row, HTML-escaped."""
    rows = "".join(
        f"<tr><td>{html_module.escape(r.prompt)}</td><td>{html_module.escape(r.interventions)}</td>"
        f"<td><b>{html_module.escape(r.continuation)}</b></td></tr>" for r in df.itertuples())
    return ("<table><tr><th>prompt</th><th>interventions</th><th>continuation</th></tr>"
            f"{rows}</table>")


class _Stream:
    """Continuations shown as they grow: an updating cell output in IPython, else printed."""

    def __init__(self, stream, rows, active):
        self.callback = stream if callable(stream) else None
        self.rows, self.active, self.handle = rows, active, None
        if self.callback is None:
            try:
                from IPython import get_ipython
                from IPython.display import HTML, display

                if get_ipython() is not None:
                    self.handle = display(HTML(""), display_id=True)
            except ImportError:
                pass

    def update(self, tokenizer, generated) -> None:
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
        if self.callback is not None:
            try:
                self.callback(texts)
            except Exception as error:
                raise GenerationError(f"the stream function raised {type(error).__name__}: {error}; it is "
                                      "called with the list of continuations after each step") from error
            return
        if self.handle is not None:
            from IPython.display import HTML

            import pandas as pd

            df = pd.DataFrame({"prompt": self.rows, "continuation": texts,
                               "interventions": [("on" if a else "off") for a in self.active]
                               if self.active else [""] * len(texts)})
            self.handle.update(HTML(_table(df)))
        else:
            print("\r" + " | ".join(t.replace("\n", " ")[-60:] for t in texts), end="", flush=True)
