"""Training a cross-layer transcoder (`mechnb.transcoders.clt`) from one forward pass per batch.

    >>> clt = mechnb.transcoders.train(model, texts, width=512, k=16, cross_layer=True)

Each step runs the model once over a batch of windows (as the per-layer trainer,
`mechnb.transcoders.train`, each window's first position left out), keeps what every layer's
MLP reads and writes, and takes one Adam step on the whole CLT: every layer's features are
encoded from its own MLP input, and the prediction of layer M's MLP output is the sum of what
the features of layers L <= M (within the decoder `window`) write there. The loss is the
squared error summed over layers (each layer's values scaled to mean norm sqrt(d_model)).

The recipe is the per-layer trainer's, per layer: input and output scales folded in at the
end; `b_dec` the geometric median of the first batch's outputs; features start as tokens of
that batch, with their own layer's decoder block the token's output and the blocks for later
layers zero (the CLT starts as a per-layer set and learns to write further), the encoder
scaled to fit; each feature's decoder (all its blocks together) kept at unit norm; topk with
the auxiliary-k loss for dead features (their top pre-activations, written where they write,
together explaining the residual error), or jumprelu with a straight-through L0 penalty. Each
layer's decoders are one `width (targets d)` matrix read sparsely: a step costs the encoders'
dense products and, per token, k decoder rows per layer.

Resumable like the per-layer trainer (`checkpoint=DIR`, `save_every`), Ctrl-C returns the CLT
as it is. Over several ranks (torchrun) the CLT trains data parallel (`ddp`): gradients summed,
dead counters and statistics global. `autocast=True` runs the model's forward in bfloat16.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..core.errors import TranscoderError
from .clt import CrossLayerTranscoder, check_window
from .model import Transcoder


WARMUP = None  # steps of linear learning-rate warm-up (None: a tenth of the run, at most 100)


class _AddInto(torch.autograd.Function):
    """`buffer[:, start:start + t] += written`, in place, its backward a view of the gradient: the
    writes of every layer summed into one prediction without autograd copying it per layer."""

    @staticmethod
    def forward(ctx, buffer, written, start: int):
        buffer[:, start:start + written.shape[1]].add_(written)
        ctx.mark_dirty(buffer)
        ctx.start, ctx.count = start, written.shape[1]
        return buffer

    @staticmethod
    def backward(ctx, grad):
        return grad, grad[:, ctx.start:ctx.start + ctx.count], None


class _CrossLayer(torch.nn.Module):
    """The CLT as it trains, in scaled units: per layer an encoder, `b_dec`, threshold, skip, and
    its decoders as one `width (targets d)` matrix."""

    def __init__(self, n: int, d: int, width: int, kind: str, k: int | None, skip: bool, window, device):
        super().__init__()
        self.n, self.d, self.kind, self.k, self.window = n, d, kind, k, window
        z = lambda *shape: torch.nn.Parameter(torch.zeros(*shape, device=device))
        self.W_enc = torch.nn.ParameterList(z(d, width) for _ in range(n))
        self.b_enc = torch.nn.ParameterList(z(width) for _ in range(n))
        self.threshold = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(width, device=device), requires_grad=kind == "jumprelu") for _ in range(n))
        self.b_dec = z(n, d)
        self.W_dec = torch.nn.ParameterList(z(width, len(self.targets(layer)) * d) for layer in range(n))
        self.W_skip = torch.nn.ParameterList(z(d, d) for _ in range(n)) if skip else None

    def targets(self, layer: int) -> range:
        return range(layer, self.n if self.window is None else min(self.n, layer + self.window))

    def encode(self, layer: int, x: torch.Tensor, dead: torch.Tensor | None):
        """`(indices, values, offsets, fired, extra, l0)` of one layer: the active features as a
        flat list (`offsets`: each token's first), whether each feature fired, and for topk the
        dead features' auxiliary (indices, values) or for jumprelu the L0 term."""
        from ..sae.train import jumprelu_ste, step_ste
        from .train import _TopK

        n, width = len(x), self.W_enc[layer].shape[1]
        if self.kind == "topk":
            k_aux = 0 if dead is None else min(int(dead.sum()), 2 * self.k, width // 2)
            values, indices, aux_values, aux_indices = _TopK.apply(
                x, self.W_enc[layer], self.b_enc[layer], self.k, dead if k_aux else None, k_aux)
            fired = torch.bincount(indices[values > 0], minlength=width) > 0
            extra = (aux_indices, aux_values) if k_aux else None
            return indices, values, None, fired, extra, float((values > 0).sum())
        pre = x @ self.W_enc[layer] + self.b_enc[layer]
        features = jumprelu_ste(pre, self.threshold[layer])
        rows, columns = (features.detach() > 0).nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=n)
        offsets = torch.cumsum(counts, 0) - counts
        fired = torch.zeros(width, dtype=torch.bool, device=x.device)
        fired[columns] = True
        return columns, features[rows, columns], offsets, fired, step_ste(pre, self.threshold[layer]).sum(), \
            float(len(rows))

    def write(self, layer: int, indices, values, offsets, n: int) -> torch.Tensor:
        """`n targets d`: what one layer's features write to each of its target layers (each
        token's active features' decoder rows, gathered: n k targets d, not n width targets d)."""
        if offsets is None:  # topk: k per token
            out = torch.nn.functional.embedding_bag(indices, self.W_dec[layer], per_sample_weights=values, mode="sum")
        else:
            out = torch.nn.functional.embedding_bag(indices, self.W_dec[layer], offsets, per_sample_weights=values,
                                                    mode="sum")
        return out.view(n, -1, self.d)

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None):
        """`(prediction n layer d, fired layer width, extras, l0 per layer)` for scaled inputs `x`
        (`layer n d`); `dead` (`layer width` bools) turns on the auxiliary loss (topk). The
        prediction is token-major: each layer's writes add into it in place, no copy of the whole."""
        n = x.shape[1]
        prediction = self.b_dec[None].expand(n, self.n, self.d).clone()
        if self.W_skip is not None:
            prediction = prediction + torch.stack([x[m] @ self.W_skip[m].T for m in range(self.n)], 1)
        fired, extras, l0 = [], [], []
        for layer in range(self.n):
            indices, values, offsets, on, extra, count = self.encode(
                layer, x[layer], dead[layer] if dead is not None and dead[layer].any() else None)
            targets = self.targets(layer)
            prediction = _AddInto.apply(prediction, self.write(layer, indices, values, offsets, n), targets.start)
            fired.append(on)
            extras.append(extra)
            l0.append(count)
        return prediction, torch.stack(fired), extras, l0


def train_clt(model, texts, width, k, kind, skip, reads, layers, n_tokens, batch_size, context, lr, l0, seed,
              dead_tokens, checkpoint, save_every, log_every, progress, name, strategy, window, autocast):
    """See `mechnb.transcoders.train` (`cross_layer=True`) and the module docstring."""
    import pandas as pd

    from ..core import distributed
    from ..core.memory import return_to_system
    from ..sae.store import padded
    from ..sae.train import geometric_median, remove_parallel_gradient
    from .train import _Plan, token_windows

    check_window(window)
    if layers is not None and sorted(set(layers if hasattr(layers, "__iter__") else [layers])) != list(
            range(model.n_layers)):
        raise TranscoderError("a cross-layer transcoder covers every layer (its features write to the later ones): "
                              "leave layers=None")
    if strategy not in (None, "ddp"):
        raise TranscoderError(f"a cross-layer transcoder trains over ranks with strategy='ddp', not {strategy!r} "
                              "(layers and features split per-layer sets)")
    world = distributed.current()
    n, d = model.n_layers, model.d_model
    all_layers = list(range(n))
    plan = _Plan(world, "ddp", all_layers, width)
    device = model.device
    lr = lr or 4e-3
    window = window if window is None or window < n else None
    per_step = max(1, batch_size // (context - 1))
    steps = max(1, math.ceil(n_tokens / (per_step * (context - 1))))
    dead_tokens = dead_tokens or min(1_000_000, max(steps * per_step * (context - 1) // 4, batch_size))
    settings = {"cross_layer": True, "window": window, "width": width, "k": k, "kind": kind, "skip": skip,
                "reads": reads, "n_tokens": n_tokens, "batch_size": batch_size, "context": context, "lr": lr,
                "l0": l0, "seed": seed, "model": model.name, "autocast": autocast}
    torch.manual_seed(seed)
    clt = _CrossLayer(n, d, width, kind, k if kind == "topk" else None, skip, window, device)
    optimizer = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=lr)
    state = {"step": 0, "windows": 0, "tokens": 0, "seconds": 0.0, "history": [], "scales": None,
             "last_fired": None, "forward_seconds": 0.0}
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / "training.json").is_file():
        state = _resume(folder, settings, clt, optimizer)
    last_fired = (state["last_fired"].to(device) if state["last_fired"] is not None
                  else torch.zeros(n, width, dtype=torch.long, device=device))
    windows = token_windows(model, texts, context)
    for _ in range(state["windows"]):
        next(windows, None)
    bar = None
    if progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc=f"training a {n}-layer cross-layer transcoder",
                   unit="step", delay=2)
    decay_from = int(0.8 * steps)
    # Adam's first steps move every weight by about lr: on the later-layer blocks, which start at
    # zero, that is noise written to every later layer; a short warm-up keeps it small.
    warmup = WARMUP if WARMUP is not None else max(1, min(steps // 10, 100))
    start = time.perf_counter() - state["seconds"]
    interrupted = False
    scales = state["scales"]
    try:
        while state["step"] < steps:
            rows = [w for _, w in zip(range(per_step), windows)]
            if not rows:
                break
            tick = time.perf_counter()
            inputs, outputs = plan.values(model, all_layers, reads, rows[world.slice(len(rows))], padded,
                                          autocast=autocast)
            state["forward_seconds"] += time.perf_counter() - tick
            state["windows"] += len(rows)
            if scales is None:
                scales = plan.scales(inputs, outputs, d)
                _initialise(clt, *plan.first(inputs, outputs), scales, seed, geometric_median)
            for group in optimizer.param_groups:  # warm up, hold, decay over the last fifth
                group["lr"] = lr * min(1.0, (state["step"] + 1) / warmup, (steps - state["step"]) / max(1, steps - decay_from))
            optimizer.zero_grad(set_to_none=True)
            count = plan.count(inputs.shape[1])
            s_in = torch.tensor([s[0] for s in scales], device=device)[:, None, None]
            s_out = torch.tensor([s[1] for s in scales], device=device)[:, None, None]
            x, y = inputs * s_in, (outputs * s_out).transpose(0, 1).contiguous()   # y token-major
            del inputs, outputs
            dead = last_fired >= dead_tokens
            figures = _step(clt, x, y, dead, plan, count, kind, l0)
            last_fired = torch.where(figures.pop("fired"), 0, last_fired + count)
            for W_dec in clt.W_dec:
                remove_parallel_gradient(W_dec)
            if plan.data_parallel:
                plan.sum_gradients(clt)
            optimizer.step()
            with torch.no_grad():
                for W_dec in clt.W_dec:
                    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
                if kind == "jumprelu":
                    for threshold in clt.threshold:
                        threshold.clamp_(min=1e-4)
            state["step"] += 1
            state["tokens"] += count
            del x, y
            return_to_system()
            if state["step"] % log_every == 0 or state["step"] == steps:
                fvu = figures["fvu"]
                row = {"step": state["step"], "tokens": state["tokens"], "loss": figures["loss"],
                       "fvu": sum(fvu) / n, "fvu_max": max(fvu), "l0": sum(figures["l0"]) / n,
                       "dead": float(dead.float().mean()), "lr": optimizer.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - start}
                state["history"].append(row)
                state["fvu_layers"] = fvu
                if bar is not None:
                    bar.set_postfix(fvu=f"{row['fvu']:.3f}", worst=f"{row['fvu_max']:.3f}", l0=f"{row['l0']:.1f}",
                                    dead=f"{row['dead']:.2f}")
                distributed.report(world, step=state["step"], steps=steps, tokens=state["tokens"], loss=row["loss"],
                                   fvu=row["fvu"], dead=row["dead"])
            if bar is not None:
                bar.update(1)
            if folder is not None and state["step"] % save_every == 0:
                _save(folder, settings, clt, optimizer, state, scales, last_fired, start, plan)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    if scales is None:
        raise TranscoderError("the texts gave no full window to train on: pass more text, or a shorter context")
    if folder is not None:
        _save(folder, settings, clt, optimizer, state, scales, last_fired, start, plan)
    if state["step"] < steps and not interrupted:
        import warnings

        warnings.warn(f"the texts ran out after {state['tokens']} tokens, {state['step']} of {steps} steps: "
                      "pass more text (or the same text again) for the n_tokens asked")
    seconds = time.perf_counter() - start
    meta = {"tokens": state["tokens"], "steps": state["step"], "seconds": seconds,
            "forward_seconds": state["forward_seconds"], "interrupted": interrupted,
            "fvu_layers": dict(zip(all_layers, state.get("fvu_layers", []))), "strategy": "ddp", "ranks": world.size,
            "cross_layer": True, "autocast": autocast,
            **{key: settings[key] for key in ("lr", "seed", "batch_size", "context")},
            **({"l0_coefficient": l0} if kind == "jumprelu" else {})}
    made = _folded(clt, scales, kind, k, skip, window, reads, name, meta,
                   {"name": model.name, "n_layers": n, "d_model": d})
    made.history = pd.DataFrame(state["history"])
    del clt, optimizer
    return_to_system()
    return made


def _step(clt, x, y, dead, plan, count: int, kind: str, l0: float) -> dict:
    """One step's loss and backward over every layer; per-layer FVU and L0, the loss, what fired."""
    world = plan.world
    prediction, fired, extras, l0_counts = clt(x, dead)
    error = prediction - y                                            # n layer d (y token-major)
    mse = error.pow(2).sum() / count
    loss = mse
    if kind == "jumprelu":
        loss = loss + l0 * sum(e for e in extras if e is not None) / count
    else:
        # Auxiliary-k: the dead features' top pre-activations, writing where they write, explain
        # what the prediction misses (summed into one buffer, as the prediction is).
        residual = -error.detach()
        aux, used = None, False
        for layer, extra in enumerate(extras):
            if extra is None:
                continue
            if aux is None:
                aux = torch.zeros_like(residual)
            indices, values = extra
            aux = _AddInto.apply(aux, clt.write(layer, indices, values, None, x.shape[1]), clt.targets(layer).start)
            used = True
        if used:
            scale = plan.total_rows(residual.pow(2).sum().reshape(1))[0] / count
            loss = loss + (aux - residual).pow(2).sum() / count / scale.clamp_min(1e-8) / 32
    loss.backward()
    if plan.data_parallel:
        fired = world.max_(fired.to(torch.int32)).bool()
    with torch.no_grad():
        errors = error.pow(2).sum((0, 2))
        means, squares = y.sum(0), y.pow(2).sum((0, 2))
        if plan.data_parallel:
            errors, means, squares = (world.sum_(t.detach().clone()) for t in (errors, means, squares))
        variance = squares - means.pow(2).sum(-1) / count
        fvu = (errors / variance.clamp_min(1e-12)).tolist()
        l0_values = plan.total_rows(torch.tensor(l0_counts, device=x.device)) / count
    return {"fired": fired, "loss": float(plan.total_rows(loss.detach().reshape(1))[0]), "fvu": fvu,
            "l0": l0_values.tolist()}


def _initialise(clt: _CrossLayer, inputs, outputs, scales, seed: int, geometric_median) -> None:
    """Each feature starts as one token of the first batch: its encoder column the token's centred
    input, its own layer's decoder block the token's output minus b_dec (unit), the blocks for later
    layers zero; the encoder scaled to fit its own layer's outputs. Each layer draws from its own
    seed (`seed` + layer)."""
    from .train import _unit

    d = clt.d
    with torch.no_grad():
        for layer in range(clt.n):
            generator = torch.Generator(device="cpu").manual_seed(seed + layer)
            width = clt.W_enc[layer].shape[1]
            x = inputs[layer][:8192] * scales[layer][0]
            y = outputs[layer][:8192] * scales[layer][1]
            clt.b_dec[layer].copy_(geometric_median(y))
            picks = (torch.randperm(len(x), generator=generator)[:width] if len(x) >= width
                     else torch.randint(len(x), (width,), generator=generator)).to(x.device)
            centre = x.mean(0)
            enc = _unit(x[picks] - centre, generator)
            clt.W_enc[layer].copy_(enc.T)
            clt.b_enc[layer].copy_(-(centre @ enc.T))
            clt.W_dec[layer].zero_()
            clt.W_dec[layer][:, :d] = _unit(y[picks] - clt.b_dec[layer], generator)
            if clt.kind == "jumprelu":
                clt.threshold[layer].fill_(0.001)
            indices, values, offsets, *_ = clt.encode(layer, x, None)
            predicted = clt.write(layer, indices, values, offsets, len(x))[:, 0]
            target = y - clt.b_dec[layer]
            fit = float((predicted * target).sum() / predicted.pow(2).sum().clamp_min(1e-12))
            clt.W_enc[layer].mul_(max(fit, 1e-3))
            clt.b_enc[layer].mul_(max(fit, 1e-3))


def _folded(clt: _CrossLayer, scales, kind, k, skip, window, reads, name, meta, model) -> CrossLayerTranscoder:
    """The trained CLT reading and writing raw (unscaled) values."""
    n, d = clt.n, clt.d
    encoders, decoders = {}, {}
    with torch.no_grad():
        for layer in range(n):
            s_in, s_out = scales[layer]
            width = clt.W_enc[layer].shape[1]
            tc = Transcoder(d, width, kind=kind, k=k if kind == "topk" else None, skip=skip, decoder=False,
                            device=clt.b_dec.device)
            tc.W_enc.copy_(clt.W_enc[layer] * s_in)
            tc.b_enc.copy_(clt.b_enc[layer])
            tc.threshold.copy_(clt.threshold[layer])
            tc.b_dec.copy_(clt.b_dec[layer] / s_out)
            if skip:
                tc.W_skip.copy_(clt.W_skip[layer] * s_in / s_out)
            tc.requires_grad_(False)
            encoders[layer] = tc.eval()
            targets = list(clt.targets(layer))
            out_scales = torch.tensor([scales[m][1] for m in targets], device=clt.b_dec.device)
            decoders[layer] = (clt.W_dec[layer].detach().view(width, len(targets), d) / out_scales[None, :, None]).clone()
    return CrossLayerTranscoder(encoders, decoders, reads=reads, model=model, name=name, meta=meta, window=window)


def _save(folder: Path, settings, clt, optimizer, state, scales, last_fired, start, plan) -> None:
    """Weights, Adam's moments and the reading position (rank 0 writes; the others wait)."""
    from safetensors.torch import save_file

    tensors, steps = {}, {}
    for key, p in clt.named_parameters():
        tensors[key] = p.detach().cpu().contiguous()
        moments = optimizer.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in moments:
                tensors[f"adam.{key}.{moment}"] = moments[moment].detach().cpu().contiguous()
        if "step" in moments:
            steps[key] = float(moments["step"])
    tensors["last_fired"] = last_fired.cpu().contiguous()
    with plan.world.main_writes() as main:
        if not main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "training.safetensors"))
        record = {"settings": settings, "step": state["step"], "windows": state["windows"], "tokens": state["tokens"],
                  "seconds": time.perf_counter() - start, "forward_seconds": state["forward_seconds"],
                  "history": state["history"], "scales": scales, "adam_steps": steps,
                  "fvu_layers": state.get("fvu_layers", [])}
        (folder / "training.json").write_text(json.dumps(record))


def _resume(folder: Path, settings, clt, optimizer) -> dict:
    from safetensors.torch import load_file

    record = json.loads((folder / "training.json").read_text())
    saved = record["settings"]
    if saved != json.loads(json.dumps(settings)):
        changed = [key for key in settings if saved.get(key) != json.loads(json.dumps(settings[key]))]
        raise TranscoderError(f"{folder} holds a training run with other settings ({', '.join(changed)} differ): "
                              "train with the same arguments to resume it, or use another checkpoint directory")
    tensors = load_file(str(folder / "training.safetensors"))
    with torch.no_grad():
        for key, p in clt.named_parameters():
            p.copy_(tensors[key])
            if f"adam.{key}.exp_avg" in tensors:
                optimizer.state[p] = {"step": torch.tensor(record["adam_steps"][key]),
                                      "exp_avg": tensors[f"adam.{key}.exp_avg"].to(p.device).clone(),
                                      "exp_avg_sq": tensors[f"adam.{key}.exp_avg_sq"].to(p.device).clone()}
    return {"step": record["step"], "windows": record["windows"], "tokens": record["tokens"],
            "seconds": record["seconds"], "forward_seconds": record.get("forward_seconds", 0.0),
            "history": record["history"], "scales": record["scales"], "last_fired": tensors["last_fired"].clone(),
            "fvu_layers": record.get("fvu_layers", [])}
