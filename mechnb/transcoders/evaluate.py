"""How good is a transcoder set? Each layer's reconstruction, and the model with every MLP replaced.

    >>> ev = tcs.evaluate(model, python_docs("eval"))
    >>> ev.layers            # layer, l0, fvu, cosine, dead: each transcoder on the clean run's MLP inputs
    >>> ev.summary           # loss_clean, loss_replaced, loss_zero, loss_recovered, agreement, tokens

- Per layer, on the clean run: `fvu`, the MLP output's variance the transcoder leaves
  unexplained (sum |y - y_hat|^2 / sum |y - mean y|^2); `cosine` of y and y_hat; `l0`,
  active features per token; `dead`, the share of features that never fire.
- The replacement model: every covered MLP's output replaced by its transcoder's
  prediction from the input it receives in that run (errors compound through the
  layers, as in the local replacement model without error nodes). `loss_replaced` is its
  next-token cross-entropy, `agreement` the share of tokens where its top-1 prediction is
  the clean model's; `loss_zero` has the covered MLPs' outputs zeroed instead, and
  `loss_recovered = (zero - replaced) / (zero - clean)`.

The texts are cut into windows of `context` tokens (one document's, unpacked); each
window's first position (the attention sink) is left out of every metric, and keeps its
own MLP outputs in the replaced and zeroed runs (it is left out of training too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import TranscoderError


@dataclass
class Evaluation:
    """A transcoder set's metrics (see the module docstring): `layers` (a DataFrame) and `summary`."""

    layers: object
    summary: dict

    def __repr__(self) -> str:
        head = ", ".join(f"{key} {value:.4g}" for key, value in self.summary.items())
        return f"<mechnb transcoder evaluation: {head}>\n{self.layers.to_string(index=False)}"

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<tr><th>{html.escape(key)}</th><td>{value:.4g}</td></tr>" for key, value in self.summary.items())
        return f"<table>{head}</table>{self.layers.to_html(index=False, float_format=lambda v: f'{v:.4g}')}"


def evaluate(tcs, model, texts, n_tokens: int = 10_000, context: int = 128, batch_size: int = 4) -> Evaluation:
    """Metrics of `tcs` on `texts` (see the module docstring), over about `n_tokens` tokens."""
    import pandas as pd

    from ..core.checks import is_int
    from ..core.memory import Chunks
    from ..sae.store import documents_of, take_documents, windows as windows_of

    tcs.check_model(model)
    if not is_int(n_tokens) or n_tokens < 1:
        raise TranscoderError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    documents = list(take_documents(documents_of(texts), n_tokens, model))
    windows = windows_of(model, documents, context, n_tokens)
    if not windows:
        raise TranscoderError("the texts gave no window of two tokens or more to evaluate on: pass more text")
    layers = tcs.layers
    sums = {name: torch.zeros(len(layers), dtype=torch.float64) for name in ("err", "y2", "cos", "l0")}
    y_sum = torch.zeros(len(layers), model.d_model, dtype=torch.float64)
    fired = torch.zeros(len(layers), tcs.width, dtype=torch.bool)
    totals = torch.zeros(4, dtype=torch.float64)  # loss clean, replaced, zero; agreeing tokens
    count = 0
    chunks = Chunks(batch_size, "transcoder evaluation", "windows", advice="use a smaller context")
    with torch.no_grad():
        for _, (stats, chunk_totals, chunk_count) in chunks.run(lambda part: _chunk(model, tcs, part), windows):
            for name in sums:
                sums[name] += stats[name]
            y_sum += stats["y_sum"]
            fired |= stats["fired"]
            totals += chunk_totals
            count += chunk_count
    n = max(count, 1)
    variance = sums["y2"] - (y_sum.pow(2).sum(-1) / n)
    table = pd.DataFrame({"layer": layers, "l0": (sums["l0"] / n).tolist(),
                          "fvu": (sums["err"] / variance.clamp_min(1e-12)).tolist(),
                          "cosine": (sums["cos"] / n).tolist(),
                          "dead": (~fired).float().mean(-1).tolist()})
    clean, replaced, zero = (totals[:3] / n).tolist()
    summary = {"loss_clean": clean, "loss_replaced": replaced, "loss_zero": zero,
               "loss_recovered": (zero - replaced) / (zero - clean) if zero != clean else float("nan"),
               "agreement": float(totals[3] / n), "tokens": float(count)}
    return Evaluation(table, summary)


def _chunk(model, tcs, rows):
    """Per-layer sums and the three runs' summed losses (and top-1 agreements) over some windows."""
    from ..core.arch import submodule
    from ..core.engine import run
    from ..sae.store import padded
    from .mlp import read_module, write_module

    ids, mask = padded(model, rows)
    body = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
    keep = mask.bool().clone()
    keep[:, 0] = False
    keep = keep.to(model.device)
    tokens = [[""] * ids.shape[1]] * len(rows)

    def hidden():
        out = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    inputs, outputs = {}, {}

    def keeper(store, layer):
        def fn(value):
            store[layer] = value
        return fn

    with run(model, tokens) as forward:
        for layer in tcs.layers:
            forward.hook(read_module(model, layer, tcs.reads), "input", keeper(inputs, layer))
            forward.hook(write_module(model, layer), "output", keeper(outputs, layer))
        clean_hidden = hidden()
    stats = {name: torch.zeros(len(tcs), dtype=torch.float64) for name in ("err", "y2", "cos", "l0")}
    stats["y_sum"] = torch.zeros(len(tcs), model.d_model, dtype=torch.float64)
    stats["fired"] = torch.zeros(len(tcs), tcs.width, dtype=torch.bool)
    every, cache = {}, {}
    for i, layer in enumerate(tcs.layers):
        tc = tcs[layer]
        x = inputs[layer][keep].to(tc.W_enc)
        y = outputs[layer][keep].to(tc.W_enc)
        features = every[layer] = tc.encode(x)
        y_hat = tcs.decode_layer(layer, every, x, cache).to(y)
        stats["err"][i] = (y - y_hat).double().pow(2).sum()
        stats["y2"][i] = y.double().pow(2).sum()
        stats["y_sum"][i] = y.double().sum(0)
        stats["cos"][i] = torch.nn.functional.cosine_similarity(y, y_hat, dim=-1).double().sum()
        stats["l0"][i] = (features > 0).double().sum()
        stats["fired"][i] = (features > 0).any(0).cpu()
    del inputs, outputs, every, cache
    clean_loss, clean_top = _losses(model, clean_hidden, ids, mask)
    del clean_hidden
    results = [clean_loss, 0.0, 0.0, 0.0]
    for slot, replace in ((1, "transcoder"), (2, "zero")):
        read, features, cache = {}, {}, {}
        with run(model, tokens) as forward:
            for layer in tcs.layers:
                tc = tcs[layer]
                forward.hook(read_module(model, layer, tcs.reads), "input", keeper(read, layer))

                def substitute(value, tc=tc, layer=layer):
                    if replace == "zero":
                        out = torch.zeros_like(value)
                    else:  # this run's own features (a CLT's earlier layers' too)
                        x = read[layer].to(tc.W_enc)
                        features[layer] = tc.encode(x)
                        out = tcs.decode_layer(layer, features, x, cache).to(value)
                    # Each window's first position keeps its own value, as it was left out of training.
                    return torch.where(keep[..., None], out, value)

                forward.hook(write_module(model, layer), "output", substitute)
            loss, top = _losses(model, hidden(), ids, mask)
        results[slot] = loss
        if replace == "transcoder":
            valid = mask[:, 1:].bool()
            results[3] = float((top == clean_top)[valid].sum())
    return stats, torch.tensor(results, dtype=torch.float64), int(mask[:, 1:].sum())


def _losses(model, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Summed next-token cross-entropy over the real tokens, and the top-1 predictions (`batch pos-1`),
    from the final norm's output; one row's logits at a time."""
    from ..core.engine import unembed_normed

    targets = ids[:, 1:].to(hidden.device)
    valid = mask[:, 1:].bool().to(hidden.device)
    total, tops = 0.0, []
    for row in range(len(ids)):
        logits = unembed_normed(model, hidden[row, :-1]).float()
        losses = torch.nn.functional.cross_entropy(logits, targets[row], reduction="none")
        total += losses[valid[row]].sum().item()
        tops.append(logits.argmax(-1).cpu())
    return total, torch.stack(tops)
