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
from .clt import CrossLayerTranscoder, check_window
from .mlp import mlp_values
from .model import READS, Transcoder, TranscoderSet

TRAIN_KINDS = ("topk", "jumprelu")


def token_windows(model, texts, context: int):
    """Windows of `context` token ids (BOS first where the tokenizer adds one) cut from
    `texts` packed into one stream with EOS between documents; full windows only."""
    from ..sae.store import packed_windows

    return packed_windows(model, texts, context)


class _TopK(torch.autograd.Function):
    """The top-k encoder, with gradients that touch only the selected features.

    forward(x, W_enc, b_enc, k, dead, k_aux, world) -> (values, indices, aux values, aux indices):
    each token's k largest pre-activations (ReLU'd) and, for the auxiliary loss, the
    k_aux largest among the `dead` features (none when `dead` is None); with `world`, the
    features are this rank's shard and a value counts only if it is among the k largest over
    every rank's (the others are zero, and get no gradient). The backward
    sums `x` into the encoder columns of the selected features only (n k d operations
    instead of the dense n width d product): a training step costs one dense product
    per layer, the encoder's forward.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead, k_aux, world=None):
        pre = x @ W_enc + b_enc
        top = pre.topk(min(k, pre.shape[-1]), dim=-1)
        values = torch.relu(top.values)
        if world is not None:  # features over ranks: keep what the global top k keeps
            values = values * (top.values >= world.kth_largest(pre, k)[:, None])
        if dead is not None:
            masked = pre.masked_fill_(~dead, -float("inf"))
            aux = masked.topk(min(k_aux, masked.shape[-1]), dim=-1)
            aux_values, aux_indices = torch.relu(aux.values).nan_to_num(0.0), aux.indices
            if world is not None:
                aux_values = aux_values * (aux.values >= world.kth_largest(masked, k_aux)[:, None])
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
        return None, grad_W.T, grad_b, None, None, None, None


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

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, world=None, dead_count: int | None = None):
        """`(prediction, fired (width bool), extra loss term, L0)` for scaled inputs `x`: for topk
        the auxiliary reconstruction by `dead` features (None when none are), for jumprelu
        the L0 term (summed over the tokens). With `world`, this layer's features are this
        rank's shard (`dead_count`: the dead features over every rank): top-k thresholds are
        global and the decoders' outputs summed over ranks, so the prediction is whole."""
        from ..sae.train import jumprelu_ste, step_ste

        whole = (lambda value: world.sum_keep_gradient(value)) if world is not None else (lambda value: value)
        if self.kind == "topk":
            dead_count = int(dead.sum()) if dead_count is None and dead is not None else dead_count
            k_aux = 0 if dead is None or not dead_count else min(dead_count, 2 * self.k, x.shape[1] // 2)
            values, indices, aux_values, aux_indices = _TopK.apply(
                x, self.W_enc, self.b_enc, self.k, dead if k_aux else None, k_aux, world)
            # The decoder reads k rows per token, not the whole width.
            y = whole(torch.nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum"))
            fired = torch.bincount(indices[values > 0], minlength=self.W_enc.shape[1]) > 0
            l0 = (values > 0).sum(-1).float().sum().item()
            extra = None
            if k_aux:
                extra = whole(torch.nn.functional.embedding_bag(aux_indices, self.W_dec,
                                                                per_sample_weights=aux_values, mode="sum"))
        else:
            pre = x @ self.W_enc + self.b_enc
            features = jumprelu_ste(pre, self.threshold)
            y = whole(features @ self.W_dec)
            fired = (features > 0).any(0)
            l0 = (features > 0).sum(-1).float().sum().item()
            extra = step_ste(pre, self.threshold).sum()
        y = y + self.b_dec
        if self.W_skip is not None:
            y = y + x @ self.W_skip.T
        return y, fired, extra, l0


STRATEGIES = ("ddp", "layers", "features")


@local_only
def train(model, texts, width: int | None = None, k: int | None = 32, kind: str = "topk",
          skip: bool = False, reads: str = "mlp_in", layers=None, n_tokens: int = 200_000,
          batch_size: int = 4096, context: int = 128, lr: float | None = None, l0: float = 0.1,
          seed: int = 0, dead_tokens: int | None = None, checkpoint=None, save_every: int = 25,
          log_every: int = 5, progress: bool = True, name: str = "tc", strategy: str | None = None,
          cross_layer: bool = False, window: int | None = None, autocast: bool = False) -> TranscoderSet:
    """Transcoders for `layers` (default all) of `model`, trained on `texts`; see the module doc.

    Args:
        texts: strings, token-id windows, or a datasets Dataset with `text`.
        width: features per layer (default 4 x d_model).
        k: active features per token (topk).
        kind: topk or jumprelu (`l0`: the jumprelu L0 penalty).
        skip: add a linear skip connection to each transcoder.
        reads: `mlp_in` (the MLP's input, after its norm) or `resid_mid`.
        layers: which layers (a list or range; default every layer).
        n_tokens: training tokens (each read once); `batch_size`: tokens per step (over
            every rank).
        context: tokens per window.
        lr: Adam's learning rate (default 4e-3: runs of a few hundred thousand tokens).
        dead_tokens: a feature is dead after this many tokens without firing
            (default min(1M, a quarter of training)).
        checkpoint: a directory to save to and resume from (rank 0 writes the whole state:
            a run resumes on any number of ranks).
        strategy: under torchrun, how ranks share the work; each runs the model on its share
            of every batch's windows, then: `ddp` (the default) trains every layer on its own
            rows, gradients summed; `layers` gathers the batch's values and trains only its
            own layers on all of them (sparsify's distribute_modules); `features` gathers
            them too and holds a shard of every layer's features (top-k thresholds gathered,
            the decoders' outputs summed), for widths one device cannot hold.
        cross_layer: train a cross-layer transcoder (`mechnb.transcoders.clt`): each layer's
            features write to its own and every later layer's MLP output (`window`: at most
            that many layers, its own included), trained as one model on every layer at once
            (see `train_clt`); it covers every layer and trains over ranks with ddp.
        autocast: run the model's forward in bfloat16 (about 2x on CPUs with bf16 and GPUs; the
            values the transcoders learn from then differ from float32's by ~1 % of their norm).

    Returns:
        A `TranscoderSet` (whole, on every rank), with `.history` (DataFrame: step, tokens,
        loss, fvu (mean over layers), fvu_max, l0, dead, lr, seconds) and `.meta` (per-layer
        final FVU, tokens, seconds, interrupted). Example:
        `mechnb.transcoders.train(model, texts, width=2304, k=32)`.
    """
    import pandas as pd

    from ..core import distributed
    from ..core.memory import return_to_system
    from ..sae.store import padded
    from ..sae.train import geometric_median, remove_parallel_gradient

    d = model.d_model
    width = width or 4 * d
    if cross_layer:
        _check(kind, width, k, reads, n_tokens, batch_size, context, save_every, log_every, l0, lr)
        return train_clt(model, texts, width, k, kind, skip, reads, layers, n_tokens, batch_size, context, lr, l0,
                         seed, dead_tokens, checkpoint, save_every, log_every, progress, name, strategy, window,
                         bool(autocast))
    if window is not None:
        raise TranscoderError("window is the reach of a cross-layer transcoder's decoders: train with cross_layer=True")
    layers = _layers(model, layers)
    _check(kind, width, k, reads, n_tokens, batch_size, context, save_every, log_every, l0, lr)
    if strategy is not None and strategy not in STRATEGIES:
        raise TranscoderError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if reads == "resid_mid" and model.parallel_attn_mlp:
        raise TranscoderError(f"{model.name} runs attention and MLP in parallel: it has no resid_mid; "
                              "train on reads='mlp_in'")
    world = distributed.current()
    plan = _Plan(world, strategy or "ddp", layers, width)
    device = model.device
    lr = lr or 4e-3
    per_step = max(1, batch_size // (context - 1))  # windows per step, over every rank
    steps = max(1, math.ceil(n_tokens / (per_step * (context - 1))))
    dead_tokens = dead_tokens or min(1_000_000, max(steps * per_step * (context - 1) // 4, batch_size))
    settings = {"width": width, "k": k, "kind": kind, "skip": skip, "reads": reads, "layers": layers,
                "n_tokens": n_tokens, "batch_size": batch_size, "context": context, "lr": lr, "l0": l0,
                "seed": seed, "model": model.name, **({"autocast": True} if autocast else {})}
    torch.manual_seed(seed)
    parts = torch.nn.ModuleList(_Layer(d, plan.width, kind, k if kind == "topk" else None, skip, device)
                                for _ in plan.mine)
    optimizer = torch.optim.Adam([p for p in parts.parameters() if p.requires_grad], lr=lr)
    state = {"step": 0, "windows": 0, "tokens": 0, "seconds": 0.0, "history": [],
             "scales": None, "last_fired": None}
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / "training.json").is_file():
        state = _resume(folder, settings, parts, optimizer, plan)
    last_fired = (state["last_fired"].to(device) if state["last_fired"] is not None
                  else torch.zeros(len(parts), plan.width, dtype=torch.long, device=device))
    windows = token_windows(model, texts, context)
    for _ in range(state["windows"]):  # resumed: these windows were trained on
        next(windows, None)
    bar = None
    if progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc=f"training {len(layers)} transcoders",
                   unit="step", delay=2)
    decay_from = int(0.8 * steps)
    start = time.perf_counter() - state["seconds"]
    interrupted = False
    scales = state["scales"]
    forward_seconds = 0.0  # this run's time in the model's forward (the rest: the transcoders' updates)
    try:
        while state["step"] < steps:
            rows = [w for _, w in zip(range(per_step), windows)]
            if not rows:
                break
            tick = time.perf_counter()
            inputs, outputs = plan.values(model, layers, reads, rows[world.slice(len(rows))], padded, autocast)
            forward_seconds += time.perf_counter() - tick
            state["windows"] += len(rows)  # counted once read: an interrupted read is read again on resuming
            if scales is None:
                scales = plan.scales(inputs, outputs, d)
                _initialise(parts, *plan.first(inputs, outputs), [scales[i] for i in plan.mine], seed,
                            geometric_median, plan)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (steps - state["step"]) / max(1, steps - decay_from))
            optimizer.zero_grad(set_to_none=True)
            n = plan.count(inputs.shape[1])
            logged = {"loss": [], "fvu": [], "l0": [], "dead": []}
            for i, part in enumerate(parts):
                x, y = inputs[plan.column(i)] * scales[plan.mine[i]][0], outputs[plan.column(i)] * scales[plan.mine[i]][1]
                dead = last_fired[i] >= dead_tokens
                figures = _layer_step(part, x, y, dead, plan, n, kind, l0)
                fired = figures.pop("fired")
                last_fired[i] = torch.where(fired, 0, last_fired[i] + n)
                remove_parallel_gradient(part.W_dec)
                for key, value in figures.items():
                    logged[key].append(value)
            if plan.data_parallel:
                plan.sum_gradients(parts)
            optimizer.step()
            with torch.no_grad():
                for part in parts:
                    part.W_dec.div_(part.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
                    if kind == "jumprelu":
                        part.threshold.clamp_(min=1e-4)
            state["step"] += 1
            state["tokens"] += n
            del inputs, outputs
            return_to_system()  # this batch's values are freed: hand their pages back
            if state["step"] % log_every == 0 or state["step"] == steps:
                per_layer = plan.per_layer(logged)
                row = {"step": state["step"], "tokens": state["tokens"],
                       "loss": sum(per_layer["loss"]) / len(layers), "fvu": sum(per_layer["fvu"]) / len(layers),
                       "fvu_max": max(per_layer["fvu"]), "l0": sum(per_layer["l0"]) / len(layers),
                       "dead": sum(per_layer["dead"]) / len(layers),
                       "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
                _log(state, row, per_layer["fvu"], bar, world, steps)
            if bar is not None:
                bar.update(1)
            if folder is not None and state["step"] % save_every == 0:
                _save(folder, settings, parts, optimizer, state, scales, last_fired, start, plan)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    _ended(state, steps, scales, interrupted)
    if folder is not None:
        _save(folder, settings, parts, optimizer, state, scales, last_fired, start, plan)
    every = plan.whole(parts)
    transcoders = {layer: _folded(part, scales[i], d, width, kind, k, skip) for i, (layer, part)
                   in enumerate(zip(layers, every))}
    meta = {"tokens": state["tokens"], "steps": state["step"], "seconds": time.perf_counter() - start,
            "forward_seconds": forward_seconds, "interrupted": interrupted, "fvu_layers": dict(zip(layers, state.get("fvu_layers", []))),
            "strategy": plan.strategy, "ranks": world.size,
            **{key: settings[key] for key in ("lr", "seed", "batch_size", "context")},
            **({"l0_coefficient": l0} if kind == "jumprelu" else {})}
    tcs = TranscoderSet(transcoders, reads=reads, name=name, meta=meta,
                        model={"name": model.name, "n_layers": model.n_layers, "d_model": d})
    tcs.history = pd.DataFrame(state["history"])
    del parts, optimizer, every
    return_to_system()  # the training state (Adam's moments, gradients) is freed: hand it back
    return tcs


def _log(state: dict, row: dict, fvu_layers: list, bar, world, steps: int) -> None:
    """One row of the history: kept, shown on the bar, and reported for a launched job's view."""
    from ..core import distributed

    state["history"].append(row)
    state["fvu_layers"] = fvu_layers
    if bar is not None:
        bar.set_postfix(fvu=f"{row['fvu']:.3f}", worst=f"{row['fvu_max']:.3f}", l0=f"{row['l0']:.1f}",
                        dead=f"{row['dead']:.2f}")
    distributed.report(world, step=state["step"], steps=steps, tokens=state["tokens"], loss=row["loss"],
                       fvu=row["fvu"], dead=row["dead"])


def _ended(state: dict, steps: int, scales, interrupted: bool) -> None:
    """An error when nothing was trained; a warning when the texts ran out early."""
    if scales is None:
        raise TranscoderError("the texts gave no full window to train on: pass more text, or a shorter context")
    if state["step"] < steps and not interrupted:
        import warnings

        warnings.warn(f"the texts ran out after {state['tokens']} tokens, {state['step']} of {steps} steps: "
                      "pass more text (or the same text again) for the n_tokens asked")


def _layer_step(part, x, y, dead, plan, n: int, kind: str, l0: float) -> dict:
    """One layer's loss on its rows and its backward (gradients accumulate in `part`): its
    figures, summed over the rows this rank holds, and which of its features fired."""
    world = plan.world
    sharded = world if plan.sharded else None
    dead_count = int(plan.total(dead.sum().float().reshape(1))[0]) if plan.sharded else None
    y_hat, fired, extra, l0_sum = part(x, dead if (dead_count if plan.sharded else dead.any()) else None,
                                       sharded, dead_count)
    mse = (y_hat - y).pow(2).sum() / n
    loss = mse
    penalty = torch.zeros((), device=x.device)
    if kind == "jumprelu":
        penalty = l0 * extra / n
    elif extra is not None:
        # Auxiliary-k: the dead features' top pre-activations explain the residual error.
        error = (y - y_hat).detach()
        scale = plan.total_rows(error.pow(2).sum().reshape(1))[0] / n
        loss = loss + (extra - error).pow(2).sum() / n / scale.clamp_min(1e-8) / 32
    (loss + penalty).backward()
    if plan.data_parallel:
        fired = world.max_(fired.to(torch.int32)).bool()
    with torch.no_grad():
        error_sum = (y_hat - y).pow(2).sum()
        mean, squares = y.sum(0), y.pow(2).sum()
        if plan.data_parallel:
            error_sum, mean, squares = (world.sum_(t.detach().clone()) for t in (error_sum, mean, squares))
        fvu = float(error_sum / (squares - mean.pow(2).sum() / n))
        loss_value = float(plan.total_rows(loss.detach().reshape(1))[0]) + float(
            plan.total(penalty.detach().reshape(1))[0])
        l0_value = float(plan.total(torch.tensor([l0_sum], device=x.device))[0]) / n
        dead_sum = dead.float().sum().reshape(1)
        dead_value = float(plan.total(dead_sum)[0] if plan.sharded else dead_sum[0]) / plan.width_of_all
    return {"fired": fired, "loss": loss_value, "fvu": fvu, "l0": l0_value, "dead": dead_value}


class _Plan:
    """How this rank takes part (see `train`'s `strategy`): which windows it runs the model on,
    which layers and features it trains, and what it shares."""

    def __init__(self, world, strategy: str, layers: list[int], width: int):
        self.world, self.strategy, self.layers, self.width_of_all = world, strategy, layers, width
        several = world.several
        self.data_parallel = several and strategy == "ddp"
        self.sharded = several and strategy == "features"
        self.by_layer = several and strategy == "layers"
        if self.by_layer and len(layers) < world.size:
            raise TranscoderError(f"layers over {world.size} ranks need at least one layer each, got {len(layers)}: "
                                  "use ddp or features")
        if self.sharded and width < world.size:
            raise TranscoderError(f"features over {world.size} ranks need at least one feature each, got {width}")
        # Indices into `layers` of the transcoders this rank trains.
        self.mine = list(range(len(layers)))[world.slice(len(layers))] if self.by_layer else list(range(len(layers)))
        self.features = world.slice(width) if self.sharded else slice(0, width)
        self.width = self.features.stop - self.features.start

    def values(self, model, layers, reads, rows, padded, autocast: bool = False):
        """What the MLPs read and write on this rank's windows; gathered into the global batch's
        when this rank trains on all of it (layers, features)."""
        ids, mask = padded(model, rows)
        inputs, outputs = mlp_values(model, layers, reads, ids, mask, autocast=autocast)
        if self.by_layer or self.sharded:
            gather = self.world.gather_uneven
            inputs = gather(inputs.transpose(0, 1).contiguous()).transpose(0, 1)
            outputs = gather(outputs.transpose(0, 1).contiguous()).transpose(0, 1)
        return inputs, outputs

    def column(self, index: int) -> int:
        """The layer (in `layers`) of this rank's `index`-th transcoder."""
        return self.mine[index]

    def first(self, inputs, outputs):
        """The first batch whole (every rank's rows), which initialisation picks features from."""
        if self.data_parallel:
            gather = self.world.gather_uneven
            inputs = gather(inputs.transpose(0, 1).contiguous()).transpose(0, 1)
            outputs = gather(outputs.transpose(0, 1).contiguous()).transpose(0, 1)
        return inputs[self.mine], outputs[self.mine]

    def scales(self, inputs, outputs, d: int) -> list:
        """Each layer's input and output scale (sqrt(d) over the mean norm), over the global batch."""
        norms = torch.stack([inputs.norm(dim=-1).sum(-1), outputs.norm(dim=-1).sum(-1)], -1).double()
        count = torch.tensor([float(inputs.shape[1])], dtype=torch.float64, device=norms.device)
        if self.data_parallel:
            norms, count = self.world.sum_(norms), self.world.sum_(count)
        means = (norms / count).tolist()
        return [[math.sqrt(d) / m[0], math.sqrt(d) / m[1]] for m in means]

    def count(self, n: int) -> int:
        return int(self.world.total(n)) if self.data_parallel else n

    def total_rows(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over ranks of a quantity each holds part of by rows (ddp)."""
        return self.world.sum_(value.detach().clone()) if self.data_parallel else value.detach()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over ranks of a quantity each holds part of by features (features) or rows (ddp)."""
        if self.sharded or self.data_parallel:
            return self.world.sum_(value.detach().clone())
        return value.detach()

    def sum_gradients(self, parts) -> None:
        """Every rank's gradients summed, in one flat all-reduce (ddp)."""
        grads = [p.grad for p in parts.parameters() if p.grad is not None]
        flat = self.world.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def per_layer(self, logged: dict) -> dict:
        """Each figure for every layer in order (layers: gathered from the ranks that train them)."""
        if not self.by_layer:
            return logged
        every = {}
        for key, values in logged.items():
            every[key] = self.world.gather_uneven(torch.tensor(values, dtype=torch.float64)).tolist()
        return every

    def whole(self, parts) -> list:
        """Every layer's trained transcoder, whole, on every rank."""
        if self.by_layer:
            made = []
            counts = self.world.counts(len(self.layers))
            owners = [rank for rank, count in enumerate(counts) for _ in range(count)]
            for index, owner in enumerate(owners):
                template = parts[0]
                part = parts[self.mine.index(index)] if owner == self.world.rank else _Layer(
                    template.W_enc.shape[0], self.width, template.kind, template.k, template.W_skip is not None,
                    template.W_dec.device)
                for parameter in part.parameters():
                    self.world.broadcast_(parameter.data, owner)
                made.append(part)
            return made
        if not self.sharded:
            return list(parts)
        made = []
        for part in parts:
            whole = _Layer(part.W_enc.shape[0], self.width_of_all, part.kind, part.k, part.W_skip is not None, "cpu")
            with torch.no_grad():
                for name, parameter in whole.named_parameters():
                    parameter.copy_(_whole_tensor(self, name, getattr(part, name)))
            made.append(whole)
        return made


# The axis each trained parameter's features run along (None: whole on every rank).
FEATURE_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None, "threshold": 0, "W_skip": None}


def _whole_tensor(plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    axis = FEATURE_AXIS[name]
    if not plan.sharded or axis is None:
        return tensor.detach()
    # In host memory, one rank's shard at a time: the whole may not fit one device.
    return plan.world.assemble(tensor.detach().movedim(axis, 0).contiguous()).movedim(0, axis)


def _shard_tensor(plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    axis = FEATURE_AXIS[name]
    return tensor if not plan.sharded or axis is None else tensor.narrow(axis, plan.features.start, plan.width)


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


def _initialise(parts, inputs, outputs, scales, seed: int, geometric_median, plan=None) -> None:
    """Each feature starts as one token of the first batch (a prototype): its encoder column
    the token's centred input, its decoder row the token's output (minus b_dec, the geometric
    median of the outputs), both unit; the encoder is then scaled by the one number that best
    fits the outputs of the batch. Each layer draws from its own seed (`seed` + its place among
    the trained layers), and features are drawn for the whole width and then this rank's
    shard kept: every split of layers or features over ranks starts from the same set."""
    with torch.no_grad():
        for i, part in enumerate(parts):
            index = plan.mine[i] if plan is not None else i
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            width = plan.width_of_all if plan is not None else part.W_dec.shape[0]
            features = plan.features if plan is not None else slice(0, width)
            x = inputs[i][:8192] * scales[i][0]
            y = outputs[i][:8192] * scales[i][1]
            part.b_dec.copy_(geometric_median(y))
            picks = (torch.randperm(len(x), generator=generator)[:width] if len(x) >= width
                     else torch.randint(len(x), (width,), generator=generator)).to(x.device)
            centre = x.mean(0)
            enc = _unit(x[picks] - centre, generator)[features]
            part.W_enc.copy_(enc.T)
            part.b_enc.copy_(-(centre @ enc.T))
            part.W_dec.copy_(_unit(y[picks] - part.b_dec, generator)[features])
            if part.kind == "jumprelu":
                part.threshold.fill_(0.001)
            predicted, *_ = part(x, world=plan.world if plan is not None and plan.sharded else None)
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


def _save(folder: Path, settings, parts, optimizer, state, scales, last_fired, start, plan) -> None:
    """The training state, to resume from: weights and Adam's moments (safetensors), the rest
    (JSON). Whole whatever the split over ranks (rank 0 writes, the others wait): a run resumes
    on any number of ranks."""
    from safetensors.torch import save_file

    tensors, steps = _whole_state(parts, optimizer, last_fired, plan)
    with plan.world.main_writes() as main:
        if not main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "training.safetensors"))
        record = {"settings": settings, "step": state["step"], "windows": state["windows"], "tokens": state["tokens"],
                  "seconds": time.perf_counter() - start, "history": state["history"], "scales": scales,
                  "adam_steps": steps, "fvu_layers": state.get("fvu_layers", [])}
        (folder / "training.json").write_text(json.dumps(record))


def _whole_state(parts, optimizer, last_fired, plan) -> tuple[dict, dict]:
    """Every layer's parameters and Adam moments (`{i}.{name}`, `adam.{i}.{name}.{moment}`), whole,
    and `last_fired`; on every rank."""
    world = plan.world
    template = parts[0]
    owners = ([rank for rank, count in enumerate(world.counts(len(plan.layers))) for _ in range(count)]
              if plan.by_layer else [None] * len(plan.layers))
    has_moments = bool(optimizer.state)  # the same on every rank: they step together
    tensors, steps = {}, {}
    for index, owner in enumerate(owners):
        mine = owner is None or owner == world.rank
        part = parts[plan.mine.index(index)] if mine else None
        for name, reference in template.named_parameters():
            values = {"": getattr(part, name) if mine else None}
            if has_moments and reference.requires_grad:
                moments = optimizer.state.get(getattr(part, name), {}) if mine else {}
                for key in ("exp_avg", "exp_avg_sq"):
                    values[f".{key}"] = moments.get(key)
                if mine and "step" in moments:
                    steps[f"{index}.{name}"] = float(moments["step"])
            for suffix, value in values.items():
                if owner is not None:  # layers: the owner's tensor, everywhere
                    value = value.detach().clone() if mine else torch.empty_like(reference)
                    value = world.broadcast_(value, owner)
                else:
                    value = _whole_tensor(plan, name, value)
                key = f"{index}.{name}" if not suffix else f"adam.{index}.{name}{suffix}"
                tensors[key] = value.cpu().contiguous()
    if plan.by_layer:
        fired = world.gather_uneven(last_fired.contiguous())
    elif plan.sharded:
        fired = world.gather_uneven(last_fired.T.contiguous()).T
    else:
        fired = last_fired
    if plan.by_layer:
        every = {}
        for rank in range(world.size):
            every.update(world.broadcast_object(steps, source=rank))
        steps = every
    tensors["last_fired"] = fired.cpu().contiguous()
    return tensors, steps


def _resume(folder: Path, settings, parts, optimizer, plan) -> dict:
    from safetensors.torch import load_file

    record = json.loads((folder / "training.json").read_text())
    saved = record["settings"]
    if saved != json.loads(json.dumps(settings)):
        changed = [key for key in settings if saved.get(key) != json.loads(json.dumps(settings[key]))]
        raise TranscoderError(f"{folder} holds a training run with other settings ({', '.join(changed)} differ): "
                              "train with the same arguments to resume it, or use another checkpoint directory")
    tensors = load_file(str(folder / "training.safetensors"))
    with torch.no_grad():
        for i, part in enumerate(parts):
            index = plan.mine[i]
            for name, p in part.named_parameters():
                p.copy_(_shard_tensor(plan, name, tensors[f"{index}.{name}"]))
                if f"adam.{index}.{name}.exp_avg" in tensors:
                    optimizer.state[p] = {
                        "step": torch.tensor(record["adam_steps"][f"{index}.{name}"]),
                        "exp_avg": _shard_tensor(plan, name, tensors[f"adam.{index}.{name}.exp_avg"]).to(p.device).clone(),
                        "exp_avg_sq": _shard_tensor(plan, name,
                                                    tensors[f"adam.{index}.{name}.exp_avg_sq"]).to(p.device).clone()}
    fired = tensors["last_fired"][plan.mine]
    if plan.sharded:
        fired = fired[:, plan.features]
    return {"step": record["step"], "windows": record["windows"], "tokens": record["tokens"],
            "seconds": record["seconds"], "history": record["history"], "scales": record["scales"],
            "last_fired": fired.clone(), "fvu_layers": record.get("fvu_layers", [])}


# -- cross-layer transcoders (cross_layer=True) --------------------------------------------------
# Training a cross-layer transcoder (`mechnb.transcoders.clt`) from one forward pass per batch.
#
#     >>> clt = mechnb.transcoders.train(model, texts, width=512, k=16, cross_layer=True)
#
# Each step runs the model once over a batch of windows (as the per-layer trainer,
# `mechnb.transcoders.train`, each window's first position left out), keeps what every layer's
# MLP reads and writes, and takes one Adam step on the whole CLT: every layer's features are
# encoded from its own MLP input, and the prediction of layer M's MLP output is the sum of what
# the features of layers L <= M (within the decoder `window`) write there. The loss is the
# squared error summed over layers (each layer's values scaled to mean norm sqrt(d_model)).
#
# The recipe is the per-layer trainer's, per layer: input and output scales folded in at the
# end; `b_dec` the geometric median of the first batch's outputs; features start as tokens of
# that batch, with their own layer's decoder block the token's output and the blocks for later
# layers zero (the CLT starts as a per-layer set and learns to write further), the encoder
# scaled to fit; each feature's decoder (all its blocks together) kept at unit norm, its
# learning rate scaled by 1/sqrt(its number of blocks) (`_clt_groups`: at 100k tokens this took
# the held-out FVU from 0.497 to 0.463 and the replaced model's loss from 9.81 to 7.99); topk with
# the auxiliary-k loss for dead features (their top pre-activations, written where they write,
# together explaining the residual error), or jumprelu with a straight-through L0 penalty. Each
# layer's decoders are one `width (targets d)` matrix read sparsely: a step costs the encoders'
# dense products and, per token, k decoder rows per layer.
#
# Resumable like the per-layer trainer (`checkpoint=DIR`, `save_every`), Ctrl-C returns the CLT
# as it is. Over several ranks (torchrun) the CLT trains data parallel (`ddp`): gradients summed,
# dead counters and statistics global. `autocast=True` runs the model's forward in bfloat16.



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
    optimizer = torch.optim.Adam(_clt_groups(clt, lr), lr=lr)
    state = {"step": 0, "windows": 0, "tokens": 0, "seconds": 0.0, "history": [], "scales": None,
             "last_fired": None, "forward_seconds": 0.0}
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / "training.json").is_file():
        state = _clt_resume(folder, settings, clt, optimizer)
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
                _clt_initialise(clt, *plan.first(inputs, outputs), scales, seed, geometric_median)
            for group in optimizer.param_groups:  # warm up, hold, decay over the last fifth
                group["lr"] = lr * group["scale"] * min(1.0, (state["step"] + 1) / warmup, (steps - state["step"]) / max(1, steps - decay_from))
            optimizer.zero_grad(set_to_none=True)
            count = plan.count(inputs.shape[1])
            s_in = torch.tensor([s[0] for s in scales], device=device)[:, None, None]
            s_out = torch.tensor([s[1] for s in scales], device=device)[:, None, None]
            x, y = inputs * s_in, (outputs * s_out).transpose(0, 1).contiguous()   # y token-major
            del inputs, outputs
            dead = last_fired >= dead_tokens
            figures = _clt_step(clt, x, y, dead, plan, count, kind, l0)
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
                _log(state, row, fvu, bar, world, steps)
            if bar is not None:
                bar.update(1)
            if folder is not None and state["step"] % save_every == 0:
                _clt_save(folder, settings, clt, optimizer, state, scales, last_fired, start, plan)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    _ended(state, steps, scales, interrupted)
    if folder is not None:
        _clt_save(folder, settings, clt, optimizer, state, scales, last_fired, start, plan)
    seconds = time.perf_counter() - start
    meta = {"tokens": state["tokens"], "steps": state["step"], "seconds": seconds,
            "forward_seconds": state["forward_seconds"], "interrupted": interrupted,
            "fvu_layers": dict(zip(all_layers, state.get("fvu_layers", []))), "strategy": "ddp", "ranks": world.size,
            "cross_layer": True, "autocast": autocast,
            **{key: settings[key] for key in ("lr", "seed", "batch_size", "context")},
            **({"l0_coefficient": l0} if kind == "jumprelu" else {})}
    made = _clt_folded(clt, scales, kind, k, skip, window, reads, name, meta,
                   {"name": model.name, "n_layers": n, "d_model": d})
    made.history = pd.DataFrame(state["history"])
    del clt, optimizer
    return_to_system()
    return made


def _clt_groups(clt: _CrossLayer, lr: float) -> list[dict]:
    """Adam's parameter groups: layer L's decoder row is unit over all its T target blocks, so
    each weight is about 1/sqrt(T d), not 1/sqrt(d) as in a per-layer decoder; its learning rate
    is scaled by 1/sqrt(T) so that a step moves it by the same fraction of itself as a per-layer
    decoder's (at lr 4e-3 and T = 30 an unscaled step is half of a weight)."""
    decoders = {id(p) for p in clt.W_dec}
    groups = [{"params": [p for p in clt.parameters() if p.requires_grad and id(p) not in decoders], "scale": 1.0}]
    for layer, W_dec in enumerate(clt.W_dec):
        groups.append({"params": [W_dec], "scale": 1.0 / math.sqrt(len(clt.targets(layer)))})
    for group in groups:
        group["lr"] = lr * group["scale"]
    return groups



def _clt_step(clt, x, y, dead, plan, count: int, kind: str, l0: float) -> dict:
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


def _clt_initialise(clt: _CrossLayer, inputs, outputs, scales, seed: int, geometric_median) -> None:
    """Each feature starts as one token of the first batch: its encoder column the token's centred
    input, its own layer's decoder block the token's output minus b_dec (unit), the blocks for later
    layers zero; the encoder scaled to fit its own layer's outputs. Each layer draws from its own
    seed (`seed` + layer)."""
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


def _clt_folded(clt: _CrossLayer, scales, kind, k, skip, window, reads, name, meta, model) -> CrossLayerTranscoder:
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


def _clt_save(folder: Path, settings, clt, optimizer, state, scales, last_fired, start, plan) -> None:
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


def _clt_resume(folder: Path, settings, clt, optimizer) -> dict:
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
