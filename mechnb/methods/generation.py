"""Generation under interventions: see what an ablation, a hook or a steering vector does
to the text the model writes.

    >>> model.steer("resid_pre.12", v, scale=8)
    >>> model.generate("I think the movie was", max_new_tokens=20, compare=True).df

Every active intervention applies at every generated step, because each step is an
ordinary forward of the whole sequence so far (prompt and generated tokens), with the
sequence as the context that resolves positions (`@-1` is the newest token).
`compare=True` puts each prompt in the batch twice and switches interventions off in
the second copy (`Context.active`), so both continuations come from one batched run.

Greedy decoding (the default) equals transformers' `generate(do_sample=False)` token
for token; sampling (`do_sample=True`, `temperature`, `top_p`) draws from a seeded
generator, so a `seed` reproduces a continuation. Rows stop at the end-of-sequence
token. Gotcha: no key/value cache is kept (each step recomputes the sequence, which
keeps position-dependent interventions exact); long generations grow quadratically.
"""

from __future__ import annotations

import html as html_module
import time

import torch

from ..core.batch import Batch, check_length
from ..core.checks import as_list, is_int
from ..core.engine import last_logits, run
from ..core.errors import GenerationError
from ..core.remote import local_only
from ..display.results import Result


@local_only
def generate(model, prompts, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, compare: bool = False, stream=None) -> Result:
    """Continue prompts with every active intervention applied at every step.

    Args:
        prompts: a prompt or a list of them (one batch).
        max_new_tokens: tokens to add (rows stop early at end-of-sequence).
        do_sample, temperature, top_p, seed: greedy by default; sampling draws from
            softmax(logits / temperature) cut to the top_p mass, seeded by `seed`.
        compare: each prompt also without interventions, in the same batch.
        stream: True shows continuations as they grow; a function receives the list
            of texts after each step.

    Returns:
        A `Result`: `.values` token ids `row token` (-1 padded); `.df` with `prompt`,
        `interventions`, `continuation`, `n_tokens`. Example:
        `model.generate("The Eiffel Tower is in", max_new_tokens=10).df.continuation[0]`.
    """

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
    rows = prompts * 2 if compare else prompts
    active = [True] * len(prompts) + [False] * len(prompts) if compare else None
    tokenizer = model.tokenizer
    first = Batch.of(tokenizer, rows)
    check_length(model, max(first.lengths) + max_new_tokens, "the longest prompt with max_new_tokens")
    sequences = [first.input_ids[i, :n].tolist() for i, n in enumerate(first.lengths)]
    generated: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    show = _Stream(stream, rows, active) if stream else None
    for _ in range(max_new_tokens):
        batch = Batch.of_ids(tokenizer, sequences)
        with run(model, batch.tokens, active=active):
            logits = last_logits(model, batch).float().cpu()
        chosen = _choose(logits, do_sample, temperature, top_p, generator)
        for i, token in enumerate(chosen.tolist()):
            if done[i]:
                continue
            sequences[i].append(token)
            generated[i].append(token)
            done[i] = token == eos
        if show is not None:
            show.update(tokenizer, generated)
        if all(done):
            break
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    width = max(len(g) for g in generated)
    values = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, g in enumerate(generated):
        values[i, :len(g)] = torch.tensor(g, dtype=torch.long)
    import pandas as pd

    df = pd.DataFrame({"prompt": rows, "interventions": [("on" if a else "off") for a in active] if compare
                       else ["on" if model.interventions else "none"] * len(rows),
                       "continuation": texts, "n_tokens": [len(g) for g in generated]})
    meta = {"title": f"generation, {max_new_tokens} new tokens", "prompts": prompts, "compare": compare,
            "do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed,
            "interventions": [repr(i) for i in model.interventions], "model": model.name,
            "axes": ["row", "token"], "seconds": round(time.perf_counter() - start_time, 3)}
    return Result(values, df, meta, html=lambda result: _table(result.df))


def _choose(logits, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """The next token of each row: argmax, or a draw from the tempered, nucleus-cut softmax."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        ordered, order = probs.sort(-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        outside = ordered.cumsum(-1) - ordered > top_p
        ordered = ordered.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


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
