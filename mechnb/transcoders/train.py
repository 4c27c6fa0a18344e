"""Training transcoders for every layer at once, from one forward pass per batch.

    >>> tcs = train(model, python_docs("train"), width=2304, k=32)      # all layers
    >>> tcs.history.tail(1)[["step", "tokens", "fvu", "fvu_max", "l0", "dead"]]

Each step runs the model once over a batch of token windows (documents packed into one
stream, EOS between them, `context` tokens a window, as `Model.collect` cuts them), keeps
what every trained layer's MLP reads and what it writes, stops the forward after the last
trained layer's MLP, and takes one Adam step for every layer's transcoder on those
values. Nothing goes to disk but the optional checkpoint: no activation store of 30
layers. Each window's first position (the attention sink) is left out.

The recipe follows the SAE trainer's (`mechnb.sae.train`), per layer:
- inputs and outputs are scaled by one number each so that their mean norm is
  sqrt(d_model); the scales are folded into the weights at the end;
- the decoder bias starts at the geometric median of the first batch's MLP outputs; each
  feature starts as one token of that batch (its centred input as the encoder column,
  its output minus b_dec as the decoder row, both unit), the encoder scaled by the one
  number that best fits the batch; the skip starts at zero;
- decoder rows are kept at unit norm (their gradient along themselves removed);
- topk: dead features (none fired in the last `dead_tokens` tokens) get the auxiliary-k
  loss; jumprelu: thresholds learnt with a straight-through estimator and an L0 penalty.
Adam, its learning rate decayed linearly to zero over the last fifth.

Resumable: with `checkpoint=DIR` the transcoders, the optimiser state and how far the
text was read are saved there every `save_every` steps and at the end (safetensors and
JSON); training again with the same arguments and directory goes on from there, on the
same windows it would have read. Ctrl-C stops training and returns the set as it is (and
saves it, with a checkpoint). The progress bar shows the mean and worst layer's FVU.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..core.checks import is_int
from ..core.errors import TranscoderError
from ..core.remote import local_only
from .mlp import mlp_values
from .model import READS, Transcoder, TranscoderSet

TRAIN_KINDS = ("topk", "jumprelu")


def token_windows(model, texts, context: int):
    """Windows of `context` token ids (BOS first where the tokenizer adds one) cut from
    `texts` packed into one stream with EOS between documents; full windows only."""
    from ..sae.store import documents_of

    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    prefix = [bos] if adds_bos else []
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    window = context - len(prefix)
    stream: list[int] = []
    for document in documents_of(texts):
        if isinstance(document, list):
            yield document
            continue
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + separator
        while len(stream) >= window:
            yield prefix + stream[:window]
            stream = stream[window:]


class _TopK(torch.autograd.Function):
    """The top-k encoder, with gradients that touch only the selected features.

    forward(x, W_enc, b_enc, k, dead, k_aux) -> (values, indices, aux values, aux indices):
    each token's k largest pre-activations (ReLU'd) and, for the auxiliary loss, the
    k_aux largest among the `dead` features (none when `dead` is None). The backward
    sums `x` into the encoder columns of the selected features only (n k d operations
    instead of the dense n width d product): a training step costs one dense product
    per layer, the encoder's forward.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead, k_aux):
        pre = x @ W_enc + b_enc
        top = pre.topk(k, dim=-1)
        values = torch.relu(top.values)
        if dead is not None:
            masked = pre.masked_fill_(~dead, -float("inf"))
            aux = masked.topk(k_aux, dim=-1)
            aux_values, aux_indices = torch.relu(aux.values).nan_to_num(0.0), aux.indices
        else:
            aux_values = aux_indices = torch.zeros(len(x), 0, dtype=pre.dtype, device=x.device)
            aux_indices = aux_indices.long()
        ctx.save_for_backward(x, top.indices, values > 0, aux_indices, aux_values > 0)
        ctx.width = W_enc.shape[1]
        ctx.mark_non_differentiable(top.indices, aux_indices)
        return values, top.indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _, grad_aux, __):
        x, indices, on, aux_indices, aux_on = ctx.saved_tensors
        flat = torch.cat([indices, aux_indices], 1)
        grads = torch.cat([grad_values * on, (grad_aux if grad_aux is not None
                                              else torch.zeros_like(aux_indices, dtype=x.dtype)) * aux_on], 1)
        n, per_row = flat.shape
        flat, grads = flat.reshape(-1), grads.reshape(-1)
        order = flat.argsort()
        rows = torch.div(order, per_row, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=ctx.width)
        offsets = torch.cumsum(counts, 0) - counts
        # Column f of the encoder's gradient: the sum of x over the tokens that selected f.
        grad_W = torch.nn.functional.embedding_bag(rows, x, offsets, mode="sum",
                                                   per_sample_weights=grads[order])
        grad_b = torch.bincount(flat, weights=grads, minlength=ctx.width).to(x.dtype)
        return None, grad_W.T, grad_b, None, None, None


class _Layer(torch.nn.Module):
    """One layer's transcoder as it trains, in scaled units (see the module docstring)."""

    def __init__(self, d: int, width: int, kind: str, k: int | None, skip: bool, device):
        super().__init__()
        self.kind, self.k = kind, k
        self.W_enc = torch.nn.Parameter(torch.zeros(d, width, device=device))
        self.b_enc = torch.nn.Parameter(torch.zeros(width, device=device))
        self.W_dec = torch.nn.Parameter(torch.zeros(width, d, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
        self.threshold = torch.nn.Parameter(torch.zeros(width, device=device), requires_grad=kind == "jumprelu")
        self.W_skip = torch.nn.Parameter(torch.zeros(d, d, device=device)) if skip else None

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None):
        """`(prediction, fired (width bool), extra loss term, L0)` for scaled inputs `x`: for topk
        the auxiliary reconstruction by `dead` features (None when none are), for jumprelu
        the L0 term."""
        from ..sae.train import jumprelu_ste, step_ste

        if self.kind == "topk":
            k_aux = 0 if dead is None else min(int(dead.sum()), 2 * self.k, x.shape[1] // 2)
            values, indices, aux_values, aux_indices = _TopK.apply(
                x, self.W_enc, self.b_enc, self.k, dead if k_aux else None, k_aux)
            # The decoder reads k rows per token, not the whole width.
            y = torch.nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
            fired = torch.bincount(indices[values > 0], minlength=self.W_enc.shape[1]) > 0
            l0 = (values > 0).sum(-1).float().mean().item()
            extra = None
            if k_aux:
                extra = torch.nn.functional.embedding_bag(aux_indices, self.W_dec, per_sample_weights=aux_values,
                                                          mode="sum")
        else:
            pre = x @ self.W_enc + self.b_enc
            features = jumprelu_ste(pre, self.threshold)
            y = features @ self.W_dec
            fired = (features > 0).any(0)
            l0 = (features > 0).sum(-1).float().mean().item()
            extra = step_ste(pre, self.threshold).sum(-1).mean()
        y = y + self.b_dec
        if self.W_skip is not None:
            y = y + x @ self.W_skip.T
        return y, fired, extra, l0


@local_only
def train(model, texts, width: int | None = None, k: int | None = 32, kind: str = "topk",
          skip: bool = False, reads: str = "mlp_in", layers=None, n_tokens: int = 200_000,
          batch_size: int = 4096, context: int = 128, lr: float | None = None, l0: float = 0.1,
          seed: int = 0, dead_tokens: int | None = None, checkpoint=None, save_every: int = 25,
          log_every: int = 5, progress: bool = True, name: str = "tc") -> TranscoderSet:
    """Transcoders for `layers` (default all) of `model`, trained on `texts`; see the module doc.

    Args:
        texts: strings, token-id windows, or a datasets Dataset with `text`.
        width: features per layer (default 4 x d_model).
        k: active features per token (topk).
        kind: topk or jumprelu (`l0`: the jumprelu L0 penalty).
        skip: add a linear skip connection to each transcoder.
        reads: `mlp_in` (the MLP's input, after its norm) or `resid_mid`.
        layers: which layers (a list or range; default every layer).
        n_tokens: training tokens (each read once); `batch_size`: tokens per step.
        context: tokens per window.
        lr: Adam's learning rate (default 4e-3: runs of a few hundred thousand tokens).
        dead_tokens: a feature is dead after this many tokens without firing
            (default min(1M, a quarter of training)).
        checkpoint: a directory to save to and resume from.

    Returns:
        A `TranscoderSet`, with `.history` (DataFrame: step, tokens, loss, fvu (mean over
        layers), fvu_max, l0, dead, lr, seconds) and `.meta` (per-layer final FVU, tokens,
        seconds, interrupted). Example: `mechnb.transcoders.train(model, texts, width=2304, k=32)`.
    """
    import pandas as pd

    from ..core.memory import return_to_system
    from ..sae.store import padded
    from ..sae.train import geometric_median, remove_parallel_gradient

    d = model.d_model
    width = width or 4 * d
    layers = _layers(model, layers)
    _check(kind, width, k, reads, n_tokens, batch_size, context, save_every, log_every, l0, lr)
    if reads == "resid_mid" and model.parallel_attn_mlp:
        raise TranscoderError(f"{model.name} runs attention and MLP in parallel: it has no resid_mid; "
                              "train on reads='mlp_in'")
    device = model.device
    lr = lr or 4e-3
    per_step = max(1, batch_size // (context - 1))  # windows per step
    steps = max(1, math.ceil(n_tokens / (per_step * (context - 1))))
    dead_tokens = dead_tokens or min(1_000_000, max(steps * per_step * (context - 1) // 4, batch_size))
    settings = {"width": width, "k": k, "kind": kind, "skip": skip, "reads": reads, "layers": layers,
                "n_tokens": n_tokens, "batch_size": batch_size, "context": context, "lr": lr, "l0": l0,
                "seed": seed, "model": model.name}
    torch.manual_seed(seed)
    parts = torch.nn.ModuleList(_Layer(d, width, kind, k if kind == "topk" else None, skip, device)
                                for _ in layers)
    optimizer = torch.optim.Adam([p for p in parts.parameters() if p.requires_grad], lr=lr)
    state = {"step": 0, "windows": 0, "tokens": 0, "seconds": 0.0, "history": [],
             "scales": None, "last_fired": None}
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / "training.json").is_file():
        state = _resume(folder, settings, parts, optimizer)
    last_fired = (torch.tensor(state["last_fired"], device=device) if state["last_fired"] is not None
                  else torch.zeros(len(layers), width, dtype=torch.long, device=device))
    windows = token_windows(model, texts, context)
    for _ in range(state["windows"]):  # resumed: these windows were trained on
        next(windows, None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc=f"training {len(layers)} transcoders",
                   unit="step", delay=2)
    decay_from = int(0.8 * steps)
    start = time.perf_counter() - state["seconds"]
    interrupted = False
    scales = state["scales"]
    try:
        while state["step"] < steps:
            rows = [w for _, w in zip(range(per_step), windows)]
            if not rows:
                break
            ids, mask = padded(model, rows)
            inputs, outputs = mlp_values(model, layers, reads, ids, mask)
            state["windows"] += len(rows)
            if scales is None:
                scales = [[math.sqrt(d) / inputs[i].norm(dim=-1).mean().item(),
                           math.sqrt(d) / outputs[i].norm(dim=-1).mean().item()] for i in range(len(layers))]
                _initialise(parts, inputs, outputs, scales, seed, geometric_median)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (steps - state["step"]) / max(1, steps - decay_from))
            optimizer.zero_grad(set_to_none=True)
            logged = {"loss": 0.0, "fvu": [], "l0": 0.0, "dead": 0.0}
            for i, part in enumerate(parts):
                x, y = inputs[i] * scales[i][0], outputs[i] * scales[i][1]
                dead = last_fired[i] >= dead_tokens
                y_hat, fired, extra, l0_now = part(x, dead if dead.any() else None)
                mse = (y_hat - y).pow(2).sum(-1).mean()
                loss = mse
                last_fired[i] = torch.where(fired, 0, last_fired[i] + len(x))
                if kind == "jumprelu":
                    loss = loss + l0 * extra
                elif extra is not None:
                    # Auxiliary-k: the dead features' top pre-activations explain the residual error.
                    error = (y - y_hat).detach()
                    loss = loss + (extra - error).pow(2).sum(-1).mean() / error.pow(2).sum(-1).mean().clamp_min(
                        1e-8) / 32
                loss.backward()
                remove_parallel_gradient(part.W_dec)
                with torch.no_grad():
                    logged["loss"] += loss.item() / len(parts)
                    logged["fvu"].append(((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item())
                    logged["l0"] += l0_now / len(parts)
                    logged["dead"] += dead.float().mean().item() / len(parts)
            optimizer.step()
            with torch.no_grad():
                for part in parts:
                    part.W_dec.div_(part.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
                    if kind == "jumprelu":
                        part.threshold.clamp_(min=1e-4)
            state["step"] += 1
            state["tokens"] += inputs.shape[1]
            del inputs, outputs
            return_to_system()  # this batch's values are freed: hand their pages back
            if state["step"] % log_every == 0 or state["step"] == steps:
                fvu = logged.pop("fvu")
                row = {"step": state["step"], "tokens": state["tokens"], **logged,
                       "fvu": sum(fvu) / len(fvu), "fvu_max": max(fvu),
                       "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
                state["history"].append(row)
                state["fvu_layers"] = fvu
                if bar is not None:
                    bar.set_postfix(fvu=f"{row['fvu']:.3f}", worst=f"{row['fvu_max']:.3f}", l0=f"{row['l0']:.1f}",
                                    dead=f"{row['dead']:.2f}")
            if bar is not None:
                bar.update(1)
            if folder is not None and state["step"] % save_every == 0:
                _save(folder, settings, parts, optimizer, state, scales, last_fired, start)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    if scales is None:
        raise TranscoderError("the texts gave no full window to train on: pass more text, or a shorter context")
    if folder is not None:
        _save(folder, settings, parts, optimizer, state, scales, last_fired, start)
    if state["step"] < steps and not interrupted:
        import warnings

        warnings.warn(f"the texts ran out after {state['tokens']} tokens, {state['step']} of {steps} steps: "
                      "pass more text (or the same text again) for the n_tokens asked")
    transcoders = {layer: _folded(part, scales[i], d, width, kind, k, skip) for i, (layer, part)
                   in enumerate(zip(layers, parts))}
    meta = {"tokens": state["tokens"], "steps": state["step"], "seconds": time.perf_counter() - start,
            "interrupted": interrupted, "fvu_layers": dict(zip(layers, state.get("fvu_layers", []))),
            **{key: settings[key] for key in ("lr", "seed", "batch_size", "context")},
            **({"l0_coefficient": l0} if kind == "jumprelu" else {})}
    tcs = TranscoderSet(transcoders, reads=reads, name=name, meta=meta,
                        model={"name": model.name, "n_layers": model.n_layers, "d_model": d})
    tcs.history = pd.DataFrame(state["history"])
    del parts, optimizer
    return_to_system()  # the training state (Adam's moments, gradients) is freed: hand it back
    return tcs


def _layers(model, layers) -> list[int]:
    if layers is None:
        return list(range(model.n_layers))
    if is_int(layers):
        layers = [layers]
    layers = sorted(set(layers)) if hasattr(layers, "__iter__") else None
    if not layers or not all(is_int(l) and 0 <= l < model.n_layers for l in layers):
        raise TranscoderError(f"layers must be layer numbers of {model.name} (0..{model.n_layers - 1}), "
                              "a list or a range, or None for all")
    return layers


def _check(kind, width, k, reads, n_tokens, batch_size, context, save_every, log_every, l0, lr) -> None:
    if kind not in TRAIN_KINDS:
        raise TranscoderError(f"transcoders train as {' or '.join(TRAIN_KINDS)}, not {kind!r}")
    if reads not in READS:
        raise TranscoderError(f"transcoders read {' or '.join(READS)}, not {reads!r}")
    for what, value in (("width", width), ("n_tokens", n_tokens), ("batch_size", batch_size),
                        ("save_every", save_every), ("log_every", log_every)):
        if not is_int(value) or value < 1:
            raise TranscoderError(f"{what} must be a positive integer, got {value!r}")
    if kind == "topk" and (not is_int(k) or not 0 < k <= width):
        raise TranscoderError(f"a topk transcoder needs k, the active features per token (1..{width}), got {k!r}")
    if not is_int(context) or context < 2:
        raise TranscoderError(f"context, the tokens per window, must be an integer >= 2, got {context!r}")
    for what, value in (("l0", l0), ("lr", lr)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise TranscoderError(f"{what} must be a positive number, got {value!r}")


def _initialise(parts, inputs, outputs, scales, seed: int, geometric_median) -> None:
    """Each feature starts as one token of the first batch (a prototype): its encoder column
    the token's centred input, its decoder row the token's output (minus b_dec, the geometric
    median of the outputs), both unit; the encoder is then scaled by the one number that best
    fits the outputs of the batch."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for i, part in enumerate(parts):
            width, d = part.W_dec.shape
            x = inputs[i][:8192] * scales[i][0]
            y = outputs[i][:8192] * scales[i][1]
            part.b_dec.copy_(geometric_median(y))
            picks = (torch.randperm(len(x), generator=generator)[:width] if len(x) >= width
                     else torch.randint(len(x), (width,), generator=generator)).to(x.device)
            centre = x.mean(0)
            enc = _unit(x[picks] - centre, generator)
            part.W_enc.copy_(enc.T)
            part.b_enc.copy_(-(centre @ enc.T))
            part.W_dec.copy_(_unit(y[picks] - part.b_dec, generator))
            if part.kind == "jumprelu":
                part.threshold.fill_(0.001)
            predicted, *_ = part(x)
            predicted = predicted - part.b_dec - (x @ part.W_skip.T if part.W_skip is not None else 0)
            target = y - part.b_dec
            fit = float((predicted * target).sum() / predicted.pow(2).sum().clamp_min(1e-12))
            part.W_enc.mul_(max(fit, 1e-3))
            part.b_enc.mul_(max(fit, 1e-3))


def _unit(rows: torch.Tensor, generator) -> torch.Tensor:
    """Rows scaled to norm 1 (a random unit row where a row is zero)."""
    norms = rows.norm(dim=-1, keepdim=True)
    random = torch.randn(rows.shape, generator=generator).to(rows.device)
    rows = torch.where(norms > 1e-6, rows, random)
    return rows / rows.norm(dim=-1, keepdim=True)


def _folded(part: _Layer, scale, d: int, width: int, kind: str, k, skip: bool) -> Transcoder:
    """The trained layer as a `Transcoder` reading and writing raw (unscaled) values."""
    s_in, s_out = scale
    tc = Transcoder(d, width, kind=kind, k=k if kind == "topk" else None, skip=skip)
    with torch.no_grad():
        tc.W_enc.copy_(part.W_enc * s_in)
        tc.b_enc.copy_(part.b_enc)
        tc.W_dec.copy_(part.W_dec / s_out)
        tc.b_dec.copy_(part.b_dec / s_out)
        tc.threshold.copy_(part.threshold)
        if skip:
            tc.W_skip.copy_(part.W_skip * s_in / s_out)
    tc.requires_grad_(False)
    return tc.to(part.W_dec.device).eval()


def _save(folder: Path, settings, parts, optimizer, state, scales, last_fired, start) -> None:
    """The training state, to resume from: weights and Adam's moments (safetensors), the rest (JSON)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{name}": p.detach().cpu().contiguous() for i, part in enumerate(parts)
               for name, p in part.named_parameters()}
    names = {id(p): f"{i}.{name}" for i, part in enumerate(parts) for name, p in part.named_parameters()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            moments = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moments:
                    tensors[f"adam.{names[id(p)]}.{key}"] = moments[key].detach().cpu().contiguous()
            if "step" in moments:
                steps[names[id(p)]] = float(moments["step"])
    tensors["last_fired"] = last_fired.cpu().contiguous()
    save_file(tensors, str(folder / "training.safetensors"))
    record = {"settings": settings, "step": state["step"], "windows": state["windows"], "tokens": state["tokens"],
              "seconds": time.perf_counter() - start, "history": state["history"], "scales": scales,
              "adam_steps": steps, "fvu_layers": state.get("fvu_layers", [])}
    (folder / "training.json").write_text(json.dumps(record))


def _resume(folder: Path, settings, parts, optimizer) -> dict:
    from safetensors.torch import load_file

    record = json.loads((folder / "training.json").read_text())
    saved = record["settings"]
    if saved != json.loads(json.dumps(settings)):
        changed = [key for key in settings if saved.get(key) != json.loads(json.dumps(settings[key]))]
        raise TranscoderError(f"{folder} holds a training run with other settings ({', '.join(changed)} differ): "
                              "train with the same arguments to resume it, or use another checkpoint directory")
    tensors = load_file(str(folder / "training.safetensors"))
    by_name = {}
    with torch.no_grad():
        for i, part in enumerate(parts):
            for name, p in part.named_parameters():
                p.copy_(tensors[f"{i}.{name}"])
                by_name[f"{i}.{name}"] = p
    for key, p in by_name.items():
        if f"adam.{key}.exp_avg" in tensors:
            optimizer.state[p] = {"step": torch.tensor(record["adam_steps"][key]),
                                  "exp_avg": tensors[f"adam.{key}.exp_avg"].to(p.device),
                                  "exp_avg_sq": tensors[f"adam.{key}.exp_avg_sq"].to(p.device)}
    return {"step": record["step"], "windows": record["windows"], "tokens": record["tokens"],
            "seconds": record["seconds"], "history": record["history"], "scales": record["scales"],
            "last_fired": tensors["last_fired"].tolist(), "fvu_layers": record.get("fvu_layers", [])}
