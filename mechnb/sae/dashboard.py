"""What one feature means: its top-activating contexts, its histogram, the tokens it promotes.

    >>> sae.dashboard(1234, model, python_docs(split="eval"))

- Top contexts, as keyword-in-context lines: each centred on the token where the feature
  peaks (the peak tokens line up in one column, bold), a few tokens before and after,
  every token shaded by the feature's activation there, the number on hover (and the
  peak's in its own column). Invisible whitespace is drawn (`↵` a newline, `·` a token
  of spaces), so a feature that fires on line starts reads as such, not as a blank.
  HTML-escaped.
- A histogram of its non-zero activations, and how often it fires.
- Logit effects: `W_dec[f] @ W_U` (through the final norm's gain): the tokens the
  feature's direction promotes and suppresses when written to the residual stream.

`Model.features(prompt, sae)` (`%features`) lists, per token, the most active
features of an attached or free SAE with each feature's top promoted tokens.

Gotcha: a few features fire with activations 10-100x the rest on the first token of a
line, on whitespace or on the first position of a text. They read the residual
stream's outlier directions (the attention sink's and a handful of massive-activation
dimensions), which carry large norms and little meaning; ranked by raw activation they
come first. Rank by activation at a chosen token, or by activation over the feature's
own maximum, to find features that name something.
"""

from __future__ import annotations

import base64
import html

import torch

from ..core.checks import is_int
from ..core.errors import SAEError
from ..core.remote import local_only
from ..display.results import Result
from ..display.viz import png

BEFORE, AFTER = 10, 4  # tokens shown before and after a context's peak


def dashboard(sae, feature: int, model, texts, n_tokens: int = 20_000, top: int = 10,
              context: int = 64) -> Result:
    """One feature of an SAE, read from text: where it fires, how strongly, what it promotes.

    Args:
        feature: the feature's index.
        model: the model the SAE reads (its site is `sae.site`).
        texts: strings or a Dataset with `text`, cut into windows of `context` tokens.
        n_tokens: tokens read from the texts.
        top: top contexts shown.

    Returns:
        A `Result`: `.values` the feature's activation at every token read; `.df` the top
        contexts (`rank`, `activation`, `context`, `token`); `.meta` its firing frequency,
        maximum, promoted and suppressed tokens; shown as the dashboard (see the module
        docstring). Example: `sae.dashboard(1234, model, python_docs("eval"), n_tokens=3_000)`.
    """
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
    row_of = {owner: row for row, owner in enumerate(owners)}
    contexts = []
    for value, row in zip(best.values.tolist(), best.indices.tolist()):
        if value <= 0:
            break
        window, position = owners[row]
        ids = windows[window]
        start, stop = max(1, position - BEFORE), min(len(ids), position + AFTER + 1)
        tokens = [model.tokenizer.decode([t]) for t in ids[start:stop]]
        values = [acts[row_of[(window, p)]].item() if (window, p) in row_of else 0.0 for p in range(start, stop)]
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
                 _histogram(firing, meta["title"]),
                 "<p><b>promotes</b> " + html.escape(", ".join(repr(t) for t, _ in promoted)) + "</p>",
                 "<p><b>suppresses</b> " + html.escape(", ".join(repr(t) for t, _ in suppressed)) + "</p>",
                 "<p><b>top contexts</b> (centred on the peak token; hover a token for its activation)</p>",
                 _contexts_table(contexts, meta["max"])]
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


def _histogram(values: torch.Tensor, what: str) -> str:
    """A small PNG histogram of a feature's non-zero activations, as an inline `<img>`."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5, 2))
    if values.numel():
        ax.hist(values.numpy(), bins=40, color="#4a72b0")
    ax.set_xlabel("activation, where the feature fires")
    ax.set_ylabel("tokens")
    ax.set_title(f"{what}: {values.numel()} firing tokens", fontsize=9)
    figure.tight_layout()
    return f'<img src="data:image/png;base64,{base64.b64encode(png(figure, tight=False)).decode()}"/>'


def _visible(token: str) -> str:
    """A token as it reads, with whitespace that would be invisible drawn: newlines as `↵`,
    tabs as `⇥`, and a token of spaces alone as `·`s."""
    shown = token.replace("\n", "↵").replace("\t", "⇥")
    return "·" * len(shown) if shown and not shown.strip(" ") else shown


def _contexts_table(contexts: list[dict], peak: float) -> str:
    """Keyword-in-context rows: left context, the peak token (bold), right context; each
    token shaded by its activation (of `peak`, the feature's largest), the value on hover."""
    def span(token: str, value: float, bold: bool = False) -> str:
        shade = max(0.0, min(1.0, value / peak)) if peak > 0 else 0.0
        weight = "font-weight:700;outline:1px solid #c0392b;" if bold else ""
        return (f'<span title="activation {value:.3g}" style="background:rgba(214,39,40,{shade:.2f});'
                f'white-space:pre;{weight}">{html.escape(_visible(token))}</span>')

    rows = []
    for rank, context in enumerate(contexts, 1):
        focus, tokens, values = context["focus"], context["tokens"], context["values"]
        left = "".join(span(t, v) for t, v in zip(tokens[:focus], values[:focus]))
        right = "".join(span(t, v) for t, v in zip(tokens[focus + 1:], values[focus + 1:]))
        rows.append(f"<tr><td style='text-align:right'>{rank}</td>"
                    f"<td style='text-align:right'>{context['activation']:.3g}</td>"
                    f"<td style='text-align:right;font-family:monospace'>{left}</td>"
                    f"<td style='text-align:center;font-family:monospace'>"
                    f"{span(tokens[focus], values[focus], bold=True)}</td>"
                    f"<td style='text-align:left;font-family:monospace'>{right}</td></tr>")
    return ("<table class='mechnb-contexts'><tr><th>#</th><th>activation</th><th>before</th><th>peak</th>"
            f"<th>after</th></tr>{''.join(rows)}</table>")
