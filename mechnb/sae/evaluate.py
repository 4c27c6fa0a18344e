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

The texts are cut into windows of `context` tokens (one document's, unpacked), and
every metric is over the same windows: the SAE's over the site's values in the clean
run (`n_tokens` of them), the losses over every next token. Every window's first
position (the attention sink, see `mechnb.sae.store`) is left out of the SAE's metrics
and keeps its own value in the spliced and zero-ablated runs, as it is left out of
training. Those two runs start at the site's layer, from the clean run's input of it
(`mechnb.core.runner.LayerCalls`): at `resid_post.12` of a 30-layer model the
evaluation computes 2.1 forwards' worth of layers instead of 3.4.
"""

from __future__ import annotations

import torch

from ..core.errors import SAEError


def evaluate(sae, model, texts, n_tokens: int = 20_000, context: int = 128, batch_size: int = 16):
    """A DataFrame of metrics (`metric`, `value`); see the module docstring."""
    import pandas as pd

    from ..core.memory import Chunks
    from .store import documents_of, one_site, take_documents, windows as windows_of

    (site,) = one_site(model, sae.site)
    documents = list(take_documents(documents_of(texts), n_tokens, model))
    windows = windows_of(model, documents, context, n_tokens)
    if not windows:
        raise SAEError("the texts gave no window of two tokens or more to evaluate on: pass more text")
    chunks = Chunks(batch_size, "SAE evaluation", "windows", advice="use a smaller context")
    rows, totals, count = [], torch.zeros(3, dtype=torch.float64), 0
    for _, (values, chunk_totals, chunk_count) in chunks.run(lambda part: _chunk(model, sae, site, part), windows):
        rows.append(values)
        totals += torch.tensor(chunk_totals, dtype=torch.float64)
        count += chunk_count
    x = torch.cat(rows)[:n_tokens].to(sae.W_enc.device, sae.W_enc.dtype)
    if len(x) < n_tokens:
        import warnings

        warnings.warn(f"the texts gave {len(x)} tokens, fewer than n_tokens={n_tokens}: the metrics are "
                      f"over {len(x)} (pass more text)")
    with torch.no_grad():
        features = sae.encode(x)
        x_hat = sae.decode(features)
        active = features > 0
        fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item()
        frequency = active.float().mean(0)
    clean, spliced, zero = (totals / max(count, 1)).tolist()
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    rows = [("l0", active.float().sum(-1).mean().item()), ("fvu", fvu), ("cosine", cosine),
            ("dead", (frequency == 0).float().mean().item()),
            ("dense", (frequency > 0.1).float().mean().item()),
            ("loss_clean", clean), ("loss_spliced", spliced), ("loss_zero", zero),
            ("loss_recovered", recovered), ("tokens", float(len(x)))]
    return pd.DataFrame(rows, columns=["metric", "value"])


def _chunk(model, sae, site, rows: list[list[int]]) -> tuple[torch.Tensor, list[float], int]:
    """Some windows' site values at their real positions after the first (on CPU), their
    summed next-token cross-entropy clean, spliced and zero-ablated, and the tokens it is over."""
    from ..core.arch import submodule
    from ..core.engine import run
    from ..core.runner import LayerCalls
    from .store import kept_rows, padded

    body = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
    ids, mask = padded(model, rows)
    # Every row as long as the batch: position ranges such as `@1:` then select
    # the same columns in each (padding columns included, which nothing reads).
    tokens = [[""] * ids.shape[1]] * len(rows)

    def whole():
        out = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    captured = {}

    def keep_value(value):
        captured["value"] = value.detach()

    with run(model, tokens) as forward:
        # The spliced and zero-ablated runs differ from the clean one from the site's
        # layer on: they start there, from this run's inputs of it.
        calls = LayerCalls(model, forward, site.layer) if isinstance(site.layer, int) else None
        forward.hook_site(site.base, keep_value)
        totals = [_summed_loss(model, whole(), ids, mask)]
    values = kept_rows(captured.pop("value"), site, mask)
    norm = submodule(model.hf, model.arch.final_norm)
    for replace in (lambda part: sae(part.to(sae.W_enc.dtype)).to(part.dtype), torch.zeros_like):
        with model.hooked(f"{sae.site}@1:", replace), run(model, tokens):
            hidden = whole() if calls is None else norm(calls.resume())
            totals.append(_summed_loss(model, hidden, ids, mask))
    return values, totals, int(mask[:, 1:].sum())


def _summed_loss(model, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Summed next-token cross-entropy over the real tokens, from the final norm's output."""
    from ..core.engine import unembed_normed

    targets = ids[:, 1:].to(hidden.device)
    valid = mask[:, 1:].bool().to(hidden.device)
    total = 0.0
    # One row's logits at a time (`pos vocab`): a whole chunk's would be
    # rows x 128 x 49,152 floats, the largest allocation of an evaluation.
    with torch.no_grad():
        for row in range(len(ids)):
            logits = unembed_normed(model, hidden[row, :-1]).float()
            losses = torch.nn.functional.cross_entropy(logits, targets[row], reduction="none")
            total += losses[valid[row]].sum().item()
    return total
