"""Head detectors: which heads attend to the previous token, to earlier copies of the
current token, or to the token after an earlier copy (induction)?

Each score is the mean attention probability a head puts on the position the
behaviour predicts, on sequences of random tokens repeated twice (`A A`, each half
`seq_len` tokens): for query position i in the second half,

    previous_token   i - 1            (every position after the first)
    duplicate_token  i - seq_len      (the same token in the first half)
    induction        i - seq_len + 1  (the token that followed it there)

so every score lies in [0, 1]. Random tokens make the behaviour impossible to
fake with grammar: a head that scores high on induction is copying from context.
The meta also reports the model's loss on each half: a model with induction heads
predicts the repeated half far better than the first.

    >>> model.detect_heads("induction").values.max()
"""

from __future__ import annotations

import torch

from ..core.checks import is_int
from ..core.errors import HeadError
from ..core.remote import local_only
from ..display.results import Result

KINDS = ("induction", "previous_token", "duplicate_token")


@local_only
def detect_heads(model, kind=KINDS, n_samples: int = 8, seq_len: int = 24, seed: int = 0,
                 batch_size: int | None = None) -> Result:
    """Induction, previous-token and duplicate-token scores in [0, 1] per layer and head.

    Args:
        kind: one of `induction`, `previous_token`, `duplicate_token`, or a list of
            them (default: all three, from the same forwards).
        n_samples, seq_len, seed: sequences of random tokens, each repeated once.
        batch_size: sequences per forward (default all; halved when a chunk runs out
            of memory).

    Returns:
        A `Result` (`layer head` for one kind, `kind layer head` for a list); `.meta`
        has the loss on the first and repeated halves. Example:
        `model.detect_heads("induction").df.nlargest(5, "value")`.
    """
    import pandas as pd

    from ..core.memory import Chunks

    kinds = [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, (list, tuple)) else [kind]
    if not kinds:
        raise HeadError(f"detect_heads needs a head kind or a list of them: {', '.join(KINDS)}")
    for name in kinds:
        if name not in KINDS:
            raise HeadError(f"unknown head kind {name!r}: use one of {', '.join(KINDS)}")
    for name, value, least in (("n_samples", n_samples, 1), ("seq_len", seq_len, 2), ("seed", seed, 0)):
        if not is_int(value) or value < least:
            raise HeadError(f"detect_heads needs n_samples >= 1 and seq_len >= 2 and seed >= 0, all "
                            f"integers; got {name}={value!r}")
    tokens = random_repeated_tokens(model, n_samples, seq_len, seed)
    chunks = Chunks(batch_size, "head detection", "sequences", advice="use a smaller seq_len")
    parts = [part for _, part in chunks.run(
        lambda rows: _picked(model, tokens[rows.start:rows.stop], kinds, seq_len), range(n_samples))]
    scores = {name: torch.zeros(model.n_layers, model.n_heads) for name in kinds}
    for layer in range(model.n_layers):
        for name in kinds:
            picked = torch.cat([part[name][layer] for part, _ in parts])  # batch head q
            scores[name][layer] = picked.mean(dim=(0, 2))
    losses = torch.cat([part_losses for _, part_losses in parts])
    first, repeated = losses[:, : seq_len - 1].mean().item(), losses[:, seq_len - 1:].mean().item()
    values = scores[kinds[0]] if len(kinds) == 1 else torch.stack([scores[k] for k in kinds])
    rows = [{"kind": name, "layer": l, "head": h, "value": scores[name][l, h].item()}
            for name in kinds for l in range(model.n_layers) for h in range(model.n_heads)]
    axes = ["layer", "head"] if len(kinds) == 1 else ["kind", "layer", "head"]
    meta = {"title": f"head scores ({', '.join(kinds)}) on {n_samples} repeated random sequences",
            "kinds": kinds, "n_samples": n_samples, "scale": "probability",
            "seq_len": seq_len, "seed": seed, "model": model.name, "axes": axes,
            "labels": {"kind": kinds},
            "loss_first_half": first, "loss_repeated_half": repeated,
            "notes": [f"loss on random tokens {first:.2f}, on their repetition {repeated:.2f}"]}
    return Result(values, pd.DataFrame(rows), meta)


def attention_at(pattern: torch.Tensor, kind: str, seq_len: int) -> torch.Tensor:
    """The attention a `batch head q k` pattern of sequences repeated twice (halves of
    `seq_len`) puts where behaviour `kind` predicts, `batch head q`: for previous_token every
    query after the first, for the others each query of the second half. A head's score is
    the mean over batch and queries."""
    if kind == "previous_token":
        q = torch.arange(1, 2 * seq_len)
        return pattern[:, :, q, q - 1]
    queries = torch.arange(seq_len, 2 * seq_len)
    shift = seq_len if kind == "duplicate_token" else seq_len - 1
    return pattern[:, :, queries, queries - shift]


def _picked(model, tokens: torch.Tensor, kinds: list[str], seq_len: int):
    """One forward of some sequences: per kind, per layer, the attention each behaviour
    predicts (`batch head q`), and the next-token losses `batch pos`, all on CPU."""
    found = {}
    with model.trace(tokens):
        for layer in range(model.n_layers):
            found[layer] = model[f"pattern.{layer}"].save()
        found["logits"] = model["logits"].save()
    picked = {name: [] for name in kinds}
    for layer in range(model.n_layers):
        pattern = found[layer].float().cpu()  # batch head q k
        for name in kinds:
            picked[name].append(attention_at(pattern, name, seq_len))
    logits = found.pop("logits")
    targets = tokens[:, 1:].to(logits.device)
    # Row by row: a copy of all rows' logits (and softmax's own) would double the peak.
    losses = torch.stack([torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none")
                          for row in range(len(tokens))]).cpu()
    return picked, losses


def random_repeated_tokens(model, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples 2*seq_len` token ids: random ordinary tokens, then the same again."""
    generator = torch.Generator().manual_seed(seed)
    special = set(model.tokenizer.all_special_ids)
    low = max(special) + 1 if special and max(special) < 1000 else 0
    half = torch.randint(low, model.vocab_size, (n_samples, seq_len), generator=generator)
    return torch.cat([half, half], dim=1)
