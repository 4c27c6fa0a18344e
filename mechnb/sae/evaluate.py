"""How good is an SAE? Sparsity, reconstruction, and what splicing it in costs the model.

    >>> sae.evaluate(model, python_docs(split="eval"))
              metric      value
    0             l0      32.0
    1            fvu     0.18 ...

- `l0`: active features per token; `fvu`: fraction of variance unexplained,
  sum |x - x_hat|^2 / sum |x - mean x|^2; `cosine`: mean cosine of x and x_hat;
- `dead`: fraction of features that never fire on the evaluation tokens; `dense`:
  fraction that fire on more than 10 % of them;
- `loss_clean`, `loss_spliced` (the site replaced by the SAE's reconstruction),
  `loss_zero` (the site zero-ablated): next-token cross-entropy over the texts, and
  `loss_recovered = (zero - spliced) / (zero - clean)`.

Every window's first position (the attention sink, see `mechnb.sae.store`) keeps
its own value in the spliced and zero-ablated runs, as it is left out of training.
"""

from __future__ import annotations

import torch


def evaluate(sae, model, texts, n_tokens: int = 20_000, context: int = 128, batch_size: int = 16):
    """A DataFrame of metrics (`metric`, `value`); see the module docstring."""
    import pandas as pd

    from ..core.memory import Chunks
    from .store import collect, documents_of, take_documents, windows as windows_of

    documents = list(take_documents(documents_of(texts), n_tokens, model))
    store = collect(model, sae.site, documents, n_tokens=n_tokens, context=context,
                    batch_size=batch_size, progress=False)
    x = store.rows(0, len(store)).to(sae.W_enc.device, sae.W_enc.dtype)
    with torch.no_grad():
        features = sae.encode(x)
        x_hat = sae.decode(features)
        active = features > 0
        fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item()
        frequency = active.float().mean(0)
    windows = windows_of(model, documents, context, len(store))
    # One budget for the three runs: a size halved after running out of memory stays halved.
    chunks = Chunks(batch_size, "SAE evaluation", "windows", advice="use a smaller context")
    clean = _loss(model, windows, chunks)
    with model.hooked(f"{sae.site}@1:", lambda part: sae(part.to(sae.W_enc.dtype)).to(part.dtype)):
        spliced = _loss(model, windows, chunks)
    with model.hooked(f"{sae.site}@1:", torch.zeros_like):
        zero = _loss(model, windows, chunks)
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    rows = [("l0", active.float().sum(-1).mean().item()), ("fvu", fvu), ("cosine", cosine),
            ("dead", (frequency == 0).float().mean().item()),
            ("dense", (frequency > 0.1).float().mean().item()),
            ("loss_clean", clean), ("loss_spliced", spliced), ("loss_zero", zero),
            ("loss_recovered", recovered), ("tokens", float(len(store)))]
    return pd.DataFrame(rows, columns=["metric", "value"])


def _loss(model, windows: list[list[int]], chunks) -> float:
    """Mean next-token cross-entropy over the windows (real tokens only), in `chunks`."""
    total, count = 0.0, 0
    for _, (chunk_total, chunk_count) in chunks.run(lambda rows: _chunk_loss(model, rows), windows):
        total += chunk_total
        count += chunk_count
    return total / max(count, 1)


def _chunk_loss(model, rows: list[list[int]]) -> tuple[float, int]:
    """Summed next-token cross-entropy over the real tokens of some windows, and their count."""
    from ..core.arch import submodule
    from ..core.engine import run, unembed_normed

    base = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
    pad = model.tokenizer.pad_token_id or 0
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    # Every row as long as the batch: position ranges such as `@1:` then select
    # the same columns in each (padding columns included, which nothing reads).
    with run(model, [[""] * length] * len(rows)):
        out = base(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    targets = ids[:, 1:].to(hidden.device)
    valid = mask[:, 1:].bool().to(hidden.device)
    total = 0.0
    # One row's logits at a time (`pos vocab`): a whole chunk's would be
    # rows x 128 x 49,152 floats, the largest allocation of an evaluation.
    with torch.no_grad():
        for row in range(len(rows)):
            logits = unembed_normed(model, hidden[row, :-1]).float()
            losses = torch.nn.functional.cross_entropy(logits, targets[row], reduction="none")
            total += losses[valid[row]].sum().item()
    return total, int(valid.sum())
