"""What one feature means: its top-activating contexts, its histogram, the tokens it promotes.

    >>> sae.dashboard(1234, model, python_docs(split="eval"))

- Top contexts: the windows where the feature fires hardest, each shown as
  circuitsvis `ColoredTokens` with the feature's activation per token (HTML-escaped,
  like every view).
- Histogram of its non-zero activations, and how often it fires.
- Logit effects: `W_dec[f] @ W_U` (through the final norm's gain): the tokens the
  feature's direction promotes and suppresses when written to the residual stream.

`Model.features(prompt, sae)` (`%features`) lists, per token, the most active
features of an attached or free SAE with each feature's top promoted tokens.
"""

from __future__ import annotations

import base64
import html
import io

import torch

from ..core.checks import is_int
from ..core.errors import SAEError
from ..core.remote import local_only
from ..display.render import compact, view
from ..display.results import Result


def dashboard(sae, feature: int, model, texts, n_tokens: int = 20_000, top: int = 10,
              context: int = 64) -> Result:
    """A `Result` for one feature: values are its activations over the sampled tokens."""
    import pandas as pd

    from .store import collect, documents_of, take_documents, windows as windows_of

    if not 0 <= feature < sae.d_sae:
        raise SAEError(f"feature {feature} out of range: {sae.name} has features 0-{sae.d_sae - 1}")
    documents = list(take_documents(documents_of(texts), n_tokens, model))
    windows = windows_of(model, documents, context, n_tokens)
    store = collect(model, sae.site, windows, n_tokens=n_tokens, context=context, progress=False)
    x = store.rows(0, len(store)).to(sae.W_enc.device, sae.W_enc.dtype)
    with torch.no_grad():
        acts = sae.encode(x)[:, feature].float().cpu()
    # Map each stored row back to (window, position): collection keeps positions 1.. of each window.
    owners = [(w, p) for w, ids in enumerate(windows) for p in range(1, len(ids))][: len(acts)]
    best = acts.topk(min(top, len(acts)))
    contexts = []
    for value, row in zip(best.values.tolist(), best.indices.tolist()):
        if value <= 0:
            break
        window, position = owners[row]
        ids = windows[window]
        start = max(0, position - 12)
        tokens = [model.tokenizer.decode([t]) for t in ids[start:position + 4]]
        values = [0.0] * len(tokens)
        for other, (w, p) in enumerate(owners):
            if w == window and start <= p < position + 4:
                values[p - start] = acts[other].item()
        contexts.append({"activation": value, "tokens": tokens, "values": values, "focus": position - start})
    promoted, suppressed = logit_effects(sae, model, feature)
    firing = acts[acts > 0]
    meta = {"title": f"{sae.name} feature {feature}", "feature": feature, "sae": sae.name,
            "frequency": (acts > 0).float().mean().item(), "max": acts.max().item(),
            "promoted": promoted, "suppressed": suppressed, "contexts": contexts,
            "axes": ["token"], "tokens_sampled": len(acts)}
    df = pd.DataFrame([{"rank": i + 1, "activation": c["activation"],
                        "context": "".join(c["tokens"]), "token": c["tokens"][c["focus"]]}
                       for i, c in enumerate(contexts)])

    def render(result):
        parts = [f"<h4>{html.escape(meta['title'])}</h4>",
                 f"<p>fires on {meta['frequency']:.2%} of {len(acts)} tokens; max {meta['max']:.3g}</p>",
                 _histogram(firing),
                 "<p><b>promotes</b> " + html.escape(", ".join(repr(t) for t, _ in promoted)) + "</p>",
                 "<p><b>suppresses</b> " + html.escape(", ".join(repr(t) for t, _ in suppressed)) + "</p>",
                 "<p><b>top contexts</b></p>"]
        for c in contexts:
            parts.append(view("ColoredTokens", {"tokens": c["tokens"], "values": compact(c["values"], 3)}))
        return "\n".join(parts)

    return Result(acts, df, meta, html=render)


def logit_effects(sae, model, feature: int, k: int = 10):
    """`(promoted, suppressed)`: the k tokens whose logits the feature's direction raises and lowers most."""
    from ..core.arch import submodule
    from ..core.devices import parameter

    direction = sae.W_dec[feature].float()
    # Weights read onto the SAE's device (a device_map may spread or offload them).
    gain = parameter(submodule(model.hf, model.arch.final_norm), "weight", direction.device)
    gain = gain.float() if gain is not None else torch.ones_like(direction)
    if model.arch.name == "gemma2":
        gain = 1 + gain
    unembed = parameter(submodule(model.hf, model.arch.unembed), "weight", direction.device).float()
    with torch.no_grad():
        effect = unembed @ (direction * gain)
    up, down = effect.topk(k), (-effect).topk(k)
    decode = lambda ids, values: [(model.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
    return decode(up.indices, up.values), decode(down.indices, -down.values)


@local_only
def features(model, prompt: str, sae, k: int = 5) -> Result:
    """The `k` most active features of `sae` at each token of `prompt` (a `Result`).
    Example: `model.features("def add(a, b):", sae, k=3).df`."""
    import pandas as pd

    if not isinstance(sae, torch.nn.Module) or not hasattr(sae, "encode") or getattr(sae, "site", None) is None:
        raise SAEError(f"features takes a mechnb SAE that knows its site (sae.site), got {sae!r:.60}")
    if not is_int(k) or k < 1:
        raise SAEError(f"k, the features shown per token, must be a positive int, got {k!r}")
    cache = model.cache(prompt, sae.site)
    x = cache[sae.site][0].to(sae.W_enc.device, sae.W_enc.dtype)
    with torch.no_grad():
        acts = sae.encode(x).float().cpu()  # pos d_sae
    tokens = cache.tokens[0]
    top = acts.topk(min(k, sae.d_sae), dim=-1)
    labels = {}
    rows = []
    for pos, token in enumerate(tokens):
        for rank, (value, index) in enumerate(zip(top.values[pos].tolist(), top.indices[pos].tolist())):
            if value <= 0:
                continue
            if index not in labels:
                labels[index] = ", ".join(repr(t) for t, _ in logit_effects(sae, model, index, k=3)[0])
            rows.append({"pos": pos, "token": token, "rank": rank + 1, "feature": index,
                         "activation": value, "promotes": labels[index]})
    df = pd.DataFrame(rows, columns=["pos", "token", "rank", "feature", "activation", "promotes"])
    meta = {"title": f"top {sae.name} features per token", "prompt": prompt, "sae": sae.name,
            "axes": ["pos", "feature"], "note": "position 0 is the attention sink: its features "
            "reflect its outsized norm"}

    def render(result):
        table = df.to_html(index=False, float_format=lambda v: f"{v:.3g}")  # escapes its strings
        return f"<h4>{html.escape(meta['title'])}</h4>{table}"

    return Result(acts, df, meta, html=render)


def _histogram(values: torch.Tensor) -> str:
    """A small PNG histogram as an inline `<img>`."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(4, 1.8))
    if values.numel():
        ax.hist(values.numpy(), bins=40, color="#4a72b0")
    ax.set_xlabel("activation (where it fires)")
    ax.set_ylabel("tokens")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=70)
    plt.close(figure)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"/>'
