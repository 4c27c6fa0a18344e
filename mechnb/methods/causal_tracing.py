"""Causal tracing (Meng et al. 2022): where does the model recall a fact about a subject?

Corrupt the subject's token embeddings with Gaussian noise (`noise` x the standard
deviation of the embedding matrix), which makes the model forget the answer; then
restore one state from the clean run, one (layer, position) at a time, and see how
much of the answer's probability comes back. Restoring a hidden state (`kind=
"hidden"`: the residual stream leaving a layer) shows where the information lives;
restoring MLP or attention outputs (`"mlp"`, `"attn"`) over a window of `window`
layers around each layer shows which components carry it. The paper's finding: MLPs
in middle layers at the subject's last token.

    >>> result = model.causal_trace("The Eiffel Tower is located in the city of",
    ...                             subject="Eiffel Tower", kind="mlp")
    >>> result.values.shape          # layer pos: the answer's probability when restored
    >>> result.meta["clean_prob"], result.meta["corrupt_prob"]

Each noise sample is one recorded corrupted run; the restored runs are batched by
the patching engine (`mechnb.core.runner`): a restore at layer L and position p reuses
every layer below L and every position before p from the corrupted run.
"""

from __future__ import annotations

import time

import torch

from ..core.checks import is_int
from ..core.errors import CausalTraceError
from ..core.model import language_only
from ..core.remote import local_only

KINDS = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


def subject_positions(model, prompt: str, subject: str) -> list[int]:
    """Token positions of `subject`'s first occurrence in `prompt`."""
    if not isinstance(subject, str) or not subject.strip():
        raise CausalTraceError("the subject must be a non-empty string found in the prompt")
    where = prompt.find(subject)
    if where < 0:
        raise CausalTraceError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    encoded = model.tokenizer(prompt, return_offsets_mapping=True)
    spans = encoded["offset_mapping"]
    found = [i for i, (a, b) in enumerate(spans) if b > where and a < where + len(subject) and b > a]
    if not found:
        raise CausalTraceError(f"no token of the prompt covers the subject {subject!r}")
    return found


def _indices(chosen, size: int, what: str) -> list[int]:
    """`layers` or `positions`: None (all) or a non-empty list of ints in 0..size-1."""
    if chosen is None:
        return list(range(size))
    found = list(chosen) if isinstance(chosen, (list, tuple, range)) else None
    if not found or any(not is_int(i) or not 0 <= i < size for i in found):
        raise CausalTraceError(f"{what} must be None (all) or a non-empty list of ints in 0-{size - 1}, "
                               f"got {chosen!r}")
    return found


@local_only
@language_only
def causal_trace(model, prompt: str, subject: str, answer=None, noise: float = 3.0, samples: int = 10,
                 kind: str = "hidden", window: int = 10, seed: int = 0, layers=None,
                 positions=None, batch_size: int | None = None):
    """Causal tracing (Meng et al. 2022): corrupt the subject's embeddings with noise,
    restore one state at a time from the clean run, report the answer's probability.

    Args:
        prompt: the fact's prompt; subject: a substring of it (`"Eiffel Tower"`).
        answer: the answer token (default: the clean run's top prediction).
        noise: the noise's standard deviation in units of the embeddings' std.
        samples: noise draws averaged (seeded from `seed`).
        kind: `hidden` (resid_post), `mlp` or `attn` (outputs over `window` layers
            centred on each layer).
        layers, positions: restrict the grid (default all).
        batch_size: restored runs per batched forward (default from a 256 MiB
            budget); a chunk that runs out of memory is halved and run again.

    Returns:
        A `Result`, `layer pos` probabilities (a heatmap; subject tokens starred);
        `.meta` has `clean_prob` and `corrupt_prob`. Example:
        `model.causal_trace(prompt, "Eiffel Tower", kind="mlp")`.
    """
    from ..core.memory import Chunks
    from ..core.metrics import token_id
    from ..display.results import Result
    from ..core.runner import Edit, Row, TargetRun, run_rows
    from ..core.sites import Site

    start_time = time.perf_counter()
    if not isinstance(kind, str) or kind not in KINDS:
        raise CausalTraceError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(prompt, str) or not prompt:
        raise CausalTraceError("causal_trace reads one non-empty prompt string")
    if not is_int(samples) or samples < 1:
        raise CausalTraceError(f"samples must be a positive integer, got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 < noise < float("inf"):
        raise CausalTraceError(f"noise must be a positive finite number (embedding stds), got {noise!r}")
    if not is_int(window) or window < 1:
        raise CausalTraceError(f"window must be a positive integer, got {window!r}")
    subject_at = subject_positions(model, prompt, subject)
    clean = TargetRun(model, prompt)
    tokens = clean.tokens
    layers = _indices(layers, model.n_layers, "layers")
    positions = _indices(positions, clean.n, "positions")
    if answer is None:
        answer_id = int(clean.logits[0].argmax())
    else:
        answer_id, _ = token_id(model, answer)
    site_kind = KINDS[kind]
    names = sorted({f"{site_kind}.{layer}" for layer in range(model.n_layers)})
    clean_values = model.cache(prompt, names)
    from ..core.devices import parameter

    embed = parameter(model.hf.get_input_embeddings())  # loaded if offloaded (device_map)
    scale = noise * embed.detach().float().std().item()

    def restored(layer):
        if kind == "hidden":
            return [layer]
        return list(range(max(0, layer - window // 2), min(model.n_layers, layer - window // 2 + window)))

    rows = []
    for layer in layers:
        for position in positions:
            edits = [Edit(Site(site_kind, each), [position],
                          clean_values[f"{site_kind}.{each}"][:, position:position + 1])
                     for each in restored(layer)]
            rows.append(Row(edits))

    def probability(logits):
        return torch.softmax(logits.float(), -1)[:, answer_id]

    totals = torch.zeros(len(rows))
    chunks = Chunks(batch_size, "causal tracing", "rows", advice="restrict layers or positions")
    corrupt_prob = 0.0
    first, last = subject_at[0], subject_at[-1] + 1
    for sample in range(samples):
        generator = torch.Generator().manual_seed(seed + sample)
        draw = torch.randn(last - first, model.d_model, generator=generator) * scale

        def add_noise(value, draw=draw):
            return value + draw.to(value)

        with model.hooked(f"embed@{first}:{last}", add_noise):
            corrupted = TargetRun(model, prompt)
        corrupt_prob += probability(corrupted.logits)[0].item()
        totals += run_rows(model, corrupted, rows, chunks, metric=probability)
    values = (totals / samples).reshape(len(layers), len(positions))
    clean_prob = probability(clean.logits)[0].item()
    labels = [f"{tokens[p]!r}{'*' if p in subject_at else ''}" for p in positions]
    import pandas as pd

    df = pd.DataFrame([{"layer": layer, "pos": p, "token": tokens[p], "subject": p in subject_at,
                        "prob": values[i, j].item()}
                       for i, layer in enumerate(layers) for j, p in enumerate(positions)])
    answer_token = model.tokenizer.decode([answer_id])
    meta = {"title": f"causal trace ({kind}{', window ' + str(window) if kind != 'hidden' else ''}): "
                     f"p({answer_token!r}) restored; clean {clean_prob:.3f}, corrupted {corrupt_prob / samples:.3f}",
            "prompt": prompt, "subject": subject, "subject_positions": subject_at, "answer": answer_token,
            "answer_id": answer_id, "kind": kind, "window": window, "noise": noise, "noise_std": scale,
            "samples": samples, "seed": seed, "clean_prob": clean_prob, "corrupt_prob": corrupt_prob / samples,
            "model": model.name, "axes": ["layer", "pos"], "scale": "probability",
            "labels": {"layer": [str(layer) for layer in layers], "pos": labels},
            "seconds": round(time.perf_counter() - start_time, 3)}
    return Result(values, df, meta)
