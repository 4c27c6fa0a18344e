"""Reading the residual stream in vocabulary space: the logit lens and direct logit attribution.

The logit lens decodes each layer's residual stream (`resid_post.L`) through the
final norm and the unembedding, as if the model stopped there: where does the
answer first appear? Direct logit attribution (DLA) splits the final logit of an
answer (or answer minus a wrong token) into what each head and each MLP wrote to
the residual stream, passed through the final norm with its scale frozen at the
clean run's value, so the parts add up exactly:

    logit(answer) - logit(wrong) = embed + sum(heads) + sum(attention biases)
                                   + sum(MLPs) + final-norm bias (+ unembedding bias)

    >>> model.logit_lens("The Eiffel Tower is located in the city of")
    >>> model.dla(prompt, answer=" Mary", wrong=" John").meta["total"]

Conventions: heads are measured after the output projection (their share of
`attn_out`); Gemma's post-attention norm is frozen like the final one. Gemma's
final logit soft-capping is left out: DLA splits the logits before the cap.
"""

from __future__ import annotations

import torch
from einops import einsum

from ..core.arch import output_weights, submodule
from ..core.checks import is_int
from ..core.devices import parameter
from ..core.errors import LensError
from ..core.model import language_only
from ..core.remote import local_only
from ..display.results import Result


@local_only
@language_only
def logit_lens(model, prompt: str, k: int = 1) -> Result:
    """Every layer's residual decoded through the final norm and unembedding.

    Args:
        prompt: one prompt string.
        k: the top tokens kept per layer and position (in `.df`'s `top_token`).

    Returns:
        A `Result`: `.values` `layer pos`, the probability of the right next token
        (of the model's final prediction at the last position); `.df` has `layer`,
        `pos`, `token`, `top_token`, `prob`; shown as an annotated heatmap.
        Example: `model.logit_lens("The Eiffel Tower is located in the city of")`.
    """
    import pandas as pd

    if not isinstance(prompt, str):
        raise LensError("the logit lens reads one prompt string")
    if not is_int(k) or not 1 <= k <= model.vocab_size:
        raise LensError(f"k, the top tokens shown per layer and position, must be an int in "
                        f"1-{model.vocab_size}, got {k!r}")
    sites = [f"resid_post.{l}" for l in range(model.n_layers)]
    cache = model.cache(prompt, sites + ["logits"])
    tokens = cache.tokens[0]
    n = len(tokens)
    final_prediction = int(cache["logits@-1"][0].argmax())
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    targets = ids[1:n] + [final_prediction]
    with torch.no_grad():
        stacked = cache["resid_post.*"][:, 0]  # layer pos d_model
        logits = _decode(model, stacked)
        probs = torch.softmax(logits.float(), -1)
    index = torch.tensor(targets)
    right = probs[:, torch.arange(n), index].cpu()  # layer pos
    top = probs.topk(k, dim=-1)
    rows = []
    for layer in range(model.n_layers):
        for pos in range(n):
            tops = [model.tokenizer.decode([i]) for i in top.indices[layer, pos].tolist()]
            rows.append({"layer": layer, "pos": pos, "token": tokens[pos],
                         "top_token": tops[0] if k == 1 else tops,
                         "top_prob": top.values[layer, pos, 0].item(),
                         "target": model.tokenizer.decode([targets[pos]]),
                         "prob": right[layer, pos].item()})
    df = pd.DataFrame(rows)
    meta = {"title": "logit lens: probability of the next token (annotated: top token)", "scale": "probability",
            "prompt": prompt, "model": model.name, "axes": ["layer", "pos"],
            "labels": {"pos": [f"{t!r}" for t in tokens]},
            "annotations": [[str(df["top_token"][l * n + p] if k == 1 else df["top_token"][l * n + p][0])
                             for p in range(n)] for l in range(model.n_layers)],
            "final_prediction": model.tokenizer.decode([final_prediction])}
    return Result(right, df, meta)


def _decode(model, residual: torch.Tensor) -> torch.Tensor:
    """Final norm and unembedding of residual vectors `... d_model` (no soft-capping)."""
    norm = submodule(model.hf, model.arch.final_norm)
    return submodule(model.hf, model.arch.unembed)(norm(residual))


@local_only
@language_only
def dla(model, prompt: str, answer, wrong=None) -> Result:
    """Direct logit attribution of `answer` (minus `wrong`) to every head and MLP.

    Returns a `Result` with values `layer (head + 1)`, the last column the MLP;
    `.meta` has the embedding, bias and total terms, which sum to the logit
    difference. Example: `model.dla(prompt, " Mary", " John").meta["total"]`.
    """
    import pandas as pd

    from ..core.metrics import token_id

    if not isinstance(prompt, str):
        raise LensError("dla reads one prompt string")
    answer_id, note = token_id(model, answer)
    notes = [note] if note else []
    wrong_id = None
    if wrong is not None:
        wrong_id, note = token_id(model, wrong, "wrong")
        notes += [note] if note else []
    L = model.n_layers
    sites = ["resid_pre.0"] + [f"head.{l}" for l in range(L)] + [f"mlp_out.{l}" for l in range(L)]
    sites += [f"resid_post.{L - 1}"]
    gemma_norms = model.arch.attn_out != model.arch.attn
    if gemma_norms:
        sites += [f"attn_out.{l}" for l in range(L)]
    cache = model.cache(prompt, sites)
    final_in = cache[f"resid_post.{L - 1}@-1"][0].float()
    # Weights are read onto the cache's device: with a device_map they live on several.
    device = final_in.device
    unembed_module = submodule(model.hf, model.arch.unembed)
    unembed_weight, unembed_bias = parameter(unembed_module), parameter(unembed_module, "bias")
    direction = unembed_weight[answer_id].float().to(device)
    bias_term = 0.0
    if unembed_bias is not None:
        bias_term = unembed_bias[answer_id].item()
    if wrong_id is not None:
        direction = direction - unembed_weight[wrong_id].float().to(device)
        if unembed_bias is not None:
            bias_term -= unembed_bias[wrong_id].item()
    final_norm = submodule(model.hf, model.arch.final_norm)
    frozen = Frozen(final_norm, final_in)

    def through(vectors):  # vectors ... d_model at the last position -> logit contributions
        return frozen.linear(vectors) @ direction

    layers = submodule(model.hf, model.arch.layers)
    values = torch.zeros(L, model.n_heads + 1)
    attn_bias = torch.zeros(L)
    with torch.no_grad():
        for l in range(L):
            o_proj = submodule(layers[l], model.arch.o_proj)
            z = cache[f"head.{l}@-1"][0].float()  # head d_head
            per_head, bias = head_outputs(model, o_proj, z)  # head d_model
            if gemma_norms:
                post = Frozen(submodule(layers[l], model.arch.attn_out),
                              per_head.sum(0) + (bias if bias is not None else 0))
                per_head, bias = post.linear(per_head), post.offset()
            values[l, : model.n_heads] = through(per_head)
            if bias is not None:
                attn_bias[l] = through(bias)
            values[l, model.n_heads] = through(cache[f"mlp_out.{l}@-1"][0].float())
        embed = through(cache["resid_pre.0@-1"][0].float()).item()
        norm_bias = (frozen.offset() @ direction).item()
    total = embed + values.sum().item() + attn_bias.sum().item() + norm_bias + bias_term
    with torch.no_grad():
        logits = _decode(model, final_in[None])[0].float()
    actual = (logits[answer_id] - (logits[wrong_id] if wrong_id is not None else 0)).item()
    labels = [f"h{h}" for h in range(model.n_heads)] + ["mlp"]
    rows = [{"layer": l, "component": labels[c], "value": values[l, c].item()}
            for l in range(L) for c in range(model.n_heads + 1)]
    what = f"logit({answer!r})" + (f" - logit({wrong!r})" if wrong is not None else "")
    meta = {"title": f"direct logit attribution to {what}", "prompt": prompt, "model": model.name,
            "scale": "signed",
            "axes": ["layer", "component"], "labels": {"component": labels},
            "embed": embed, "attention_biases": attn_bias.sum().item(), "norm_bias": norm_bias,
            "unembed_bias": bias_term, "total": total, "logit_diff": actual, "notes": notes}
    return Result(values, pd.DataFrame(rows), meta)


def head_outputs(model, o_proj, z: torch.Tensor):
    """Each head's output through the output projection, `head d_model`, and the bias
    (on `z`'s device)."""
    per_head = einsum(z, output_weights(model, o_proj, z.device), "head d_head, head d_head d_model -> head d_model")
    bias = parameter(o_proj, "bias", z.device)
    return per_head, bias.float() if bias is not None else None


class Frozen:
    """A LayerNorm or RMSNorm with its scale frozen at one input: a linear map plus an offset.

    `linear(v)` is the norm's action on a part `v` of the input (centred for a
    LayerNorm), so that the parts of an input add up to the norm's output minus
    `offset()` (the LayerNorm bias, or zero).
    """

    def __init__(self, norm, x: torch.Tensor):
        self.norm = norm
        self.device = x.device  # the norm's weights are read here, wherever the norm lives
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6
        self.centre = isinstance(norm, torch.nn.LayerNorm)
        centred = x - x.mean(-1, keepdim=True) if self.centre else x
        self.scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        with torch.no_grad():
            out = norm(x[None].to(next(norm.parameters()).dtype))[0].float().to(x.device)
        weight = parameter(norm, "weight", x.device)
        weight = weight.float() if weight is not None else torch.ones_like(x)
        bias = self.offset()
        # Gemma's RMSNorm multiplies by (1 + weight); tell which from the norm's own output.
        self.gain = weight
        if not torch.allclose(centred / self.scale * weight + bias, out, atol=1e-4, rtol=1e-3):
            self.gain = 1 + weight

    def offset(self) -> torch.Tensor:
        bias = parameter(self.norm, "bias", self.device)
        return bias.float() if bias is not None else torch.zeros(self.norm.weight.shape[-1],
                                                                 device=self.device)

    def linear(self, v: torch.Tensor) -> torch.Tensor:
        if self.centre:
            v = v - v.mean(-1, keepdim=True)
        return v / self.scale * self.gain
