"""Training a sparse autoencoder on an activation store, reproducibly and on CPU.

    >>> sae = train(store, kind="topk", d_sae=4608, k=32)
    >>> sae.history.tail(1)[["step", "loss", "l0", "fvu", "dead"]]

The recipe, per kind:
- Inputs are scaled by one number so that their mean norm is sqrt(d_in); the scale
  is folded into the weights at the end, so the SAE reads raw activations.
- The decoder bias starts at the geometric median of a sample (`init="median"`) or
  its mean; decoder rows start as random unit vectors and the encoder as their
  transpose.
- topk / batchtopk / jumprelu keep decoder rows at unit norm after every step; relu
  instead pays an L1 penalty on activation x decoder-row norm.
- Dead features (none fired in the last `dead_tokens` tokens): topk and batchtopk
  add the auxiliary-k loss (the dead features' top pre-activations must explain the
  residual error, weight 1/32); relu resamples them towards badly reconstructed
  inputs at 25 %, 50 % and 75 % of training.
- jumprelu learns per-feature thresholds with a straight-through estimator (rectangle
  kernel of width `BANDWIDTH`) and an L0 penalty `l1`.
- batchtopk learns, as it trains, the global threshold it uses at inference.

Adam with the learning rate decayed linearly to zero over the last fifth. The
progress bar shows the live loss, L0, FVU and dead fraction. Ctrl-C stops training
and returns the SAE as it was at its best logged loss, with its history.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from ..core.checks import is_int
from ..core.errors import SAEError
from .model import KINDS, SAE


STRATEGIES = ("ddp", "features")


def train(store, kind: str = "topk", d_sae: int | None = None, k: int | None = None,
          l1: float | None = None, lr: float | None = None, batch_size: int = 4096,
          steps: int | None = None, seed: int = 0, device=None, epochs: float = 1.0,
          init: str = "median", dead_tokens: int | None = None, log_every: int = 10,
          progress: bool = True, name: str = "sae", strategy: str | None = None,
          checkpoint=None, save_every: int = 100) -> SAE:
    """Train an SAE on `store` (an `ActivationStore` or a `tokens d_in` tensor); see module doc.

    Args:
        kind: topk, batchtopk, relu or jumprelu.
        d_sae: number of features (default 8 x d_in).
        k: active features per token (topk, batchtopk).
        l1: sparsity coefficient (relu: L1, default 1.5; jumprelu: L0, default 0.1).
        lr: Adam learning rate (default 4e-4).
        batch_size, steps, epochs: tokens per step (over every rank); steps default to
            `epochs` passes.
        seed: makes initialisation and data order reproducible.
        device: where to train (default: cuda when available; under torchrun, this rank's GPU).
        init: `median` (geometric median) or `mean` for the decoder bias.
        dead_tokens: a feature is dead after this many tokens without firing
            (default min(1M, a quarter of training)).
        strategy: under torchrun (a process group), how ranks share the work: `ddp` (the
            default: each rank its share of every batch, gradients summed, every statistic
            global) or `features` (each rank 1/world of the features, every rank the whole
            batch; top-k thresholds gathered, the reconstruction summed). Without a process
            group there is one rank and no choice to make.
        checkpoint: a directory to save the training state to every `save_every` steps and
            at the end (rank 0 writes, safetensors and JSON), and to resume from: training
            again with the same arguments goes on from there, on any number of ranks.

    Returns:
        The trained `SAE` (whole, on every rank); `.history` (DataFrame: step, tokens, loss,
        mse, aux, l0, fvu, dead, lr, seconds) and `.meta` (tokens seen, passes, interrupted).
    """
    import pandas as pd

    from ..core import distributed
    from .store import ActivationStore

    if kind not in KINDS:
        raise SAEError(f"unknown SAE kind {kind!r}: use one of {', '.join(KINDS)}")
    if torch.is_tensor(store):
        if store.dim() != 2:
            raise SAEError(f"train reads activations as a tokens x d_in tensor, got shape "
                           f"{tuple(store.shape)}")
        store = ActivationStore(store.float(), len(store))
    if not isinstance(store, ActivationStore):
        raise SAEError(f"train takes an ActivationStore (from model.collect) or a tokens x d_in tensor, "
                       f"got {type(store).__name__}")
    if len(store) < 2:
        raise SAEError(f"the store holds {len(store)} activations: collect more text (model.collect(site, "
                       "texts, n_tokens)) before training")
    for what, value in (("d_sae", d_sae), ("batch_size", batch_size), ("steps", steps), ("save_every", save_every)):
        if value is not None and (not is_int(value) or value < 1):
            raise SAEError(f"{what} must be a positive integer{'' if what == 'batch_size' else ' or None'}, "
                           f"got {value!r}")
    world = distributed.current()
    strategy = _strategy(strategy, world)
    store.check()
    device = torch.device(device) if device is not None else (
        distributed.device() if world.several else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    d_in = store.d
    d_sae = d_sae or 8 * d_in
    if strategy == "features" and d_sae < world.size:
        raise SAEError(f"features over {world.size} ranks need at least one feature each, got d_sae={d_sae}")
    steps = steps or max(1, int(math.ceil(epochs * len(store) / batch_size)))
    total_tokens = steps * batch_size
    dead_tokens = dead_tokens or min(1_000_000, max(total_tokens // 4, batch_size))
    lr = lr or 4e-4
    if l1 is None:
        l1 = {"relu": 1.5, "jumprelu": 0.1}.get(kind, 0.0)
    settings = {"kind": kind, "d_sae": d_sae, "k": k, "l1": l1, "lr": lr, "batch_size": batch_size, "steps": steps,
                "seed": seed, "init": init, "dead_tokens": dead_tokens, "store_tokens": len(store), "d_in": d_in}
    if kind in ("topk", "batchtopk") and (not is_int(k) or not 0 < k <= d_sae):
        raise SAEError(f"a {kind} SAE needs k, the number of active features per token (1..{d_sae}), got {k!r}")
    plan = _Plan(world, strategy, d_sae, kind, k)

    sample = store.sample(min(len(store), 32_768), seed=seed).to(device)
    scale = math.sqrt(d_in) / sample.norm(dim=-1).mean().item()
    sae = SAE(d_in, plan.width, kind=kind, k=k if kind not in ("topk", "batchtopk") else min(k, plan.width),
              site=store.site, name=name, model=store.meta.get("model"), device=device)
    if kind in ("topk", "batchtopk"):
        sae.k = k  # the whole SAE's k: a shard may hold fewer features than that
    _initialise(sae, sample * scale, init, seed, d_sae, plan.features)
    world.broadcast_(sae.b_dec.data)  # a rank never decides alone (the median is computed on every rank)
    optimizer = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999))
    decay_from = int(0.8 * steps)
    state = {"step": 0, "tokens": 0, "epoch": 0, "batch": 0, "history": [], "threshold_sum": 0.0,
             "threshold_count": 0, "seconds": 0.0}
    last_fired = torch.zeros(plan.width, dtype=torch.long, device=device)
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / "sae_training.json").is_file():
        state, last_fired = _resume(folder, settings, sae, optimizer, plan, device)
    best_state, best_loss = None, float("inf")
    bar = None
    if progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc=f"training {kind} SAE", unit="step", delay=2)
    interrupted = False
    start = time.perf_counter() - state["seconds"]
    resample_at = {int(steps * f) for f in (0.25, 0.5, 0.75)} if kind == "relu" else set()
    try:
        while state["step"] < steps:
            for number, batch in enumerate(store.batches(batch_size, seed=seed + state["epoch"])):
                if number < state["batch"]:
                    continue  # resumed: this batch was trained on
                if state["step"] >= steps:
                    break
                x = plan.rows(batch.to(device).float() * scale)
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (steps - state["step"]) / max(1, steps - decay_from))
                row = _step(sae, x, plan, optimizer, last_fired, dead_tokens, state, l1, k, scale)
                if state["step"] + 1 in resample_at and row["dead_mask"].any():
                    _resample(sae, x, row["x_hat"], row["dead_mask"], optimizer, plan)
                    last_fired[row["dead_mask"]] = 0
                state["step"] += 1
                state["batch"] = number + 1
                state["tokens"] += row["n"]
                if state["step"] % log_every == 0 or state["step"] == steps:
                    logged = {"step": state["step"], "tokens": state["tokens"], **row["log"],
                              "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
                    state["history"].append(logged)
                    if logged["fvu"] < best_loss:
                        best_loss, best_state = logged["fvu"], copy.deepcopy(sae.state_dict())
                    if bar is not None:
                        bar.set_postfix(loss=f"{logged['loss']:.3g}", l0=f"{logged['l0']:.1f}",
                                        fvu=f"{logged['fvu']:.3f}", dead=f"{logged['dead']:.2f}")
                    distributed.report(world, step=state["step"], steps=steps, tokens=state["tokens"],
                                       loss=logged["loss"], fvu=logged["fvu"], dead=logged["dead"])
                if folder is not None and state["step"] % save_every == 0:
                    _save(folder, settings, sae, optimizer, plan, state, last_fired, start)
                if bar is not None:
                    bar.update(1)
            else:
                state["epoch"] += 1
                state["batch"] = 0
    except KeyboardInterrupt:
        interrupted = True
        if best_state is not None:
            sae.load_state_dict(best_state)
    finally:
        if bar is not None:
            bar.close()
    if folder is not None and not interrupted:
        _save(folder, settings, sae, optimizer, plan, state, last_fired, start)
    sae = plan.whole(sae)
    _fold_scale(sae, scale)
    sae.history = pd.DataFrame(state["history"])
    sae.meta = {"tokens": state["tokens"], "steps": state["step"], "passes": state["tokens"] / len(store),
                "scale": scale, "interrupted": interrupted, "seed": seed, "lr": lr, "l1": l1,
                "batch_size": batch_size, "store_tokens": len(store), "site": store.site,
                "seconds": time.perf_counter() - start, "strategy": strategy, "ranks": world.size}
    sae.requires_grad_(False)
    return sae.eval()


def _strategy(strategy, world) -> str:
    if strategy is not None and strategy not in STRATEGIES:
        extra = " (layers splits a transcoder set's layers; an SAE trains one site)" if strategy == "layers" else ""
        raise SAEError(f"unknown strategy {strategy!r} for an SAE{extra}: use one of {', '.join(STRATEGIES)}")
    return strategy or "ddp"


class _Plan:
    """How this rank takes part in training (see `train`'s `strategy`): which rows of a batch it
    trains on, which features it holds, and what it shares with the other ranks."""

    def __init__(self, world, strategy: str, d_sae: int, kind: str, k):
        self.world, self.strategy, self.d_sae, self.kind, self.k = world, strategy, d_sae, kind, k
        self.features = world.slice(d_sae) if strategy == "features" and world.several else slice(0, d_sae)
        self.width = self.features.stop - self.features.start
        self.sharded = strategy == "features" and world.several
        self.data_parallel = strategy == "ddp" and world.several

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (ddp: its contiguous share; features: all)."""
        return batch[self.world.slice(len(batch))] if self.data_parallel else batch

    def count(self, n: int) -> int:
        """The rows of the global batch, from this rank's `n`."""
        return int(self.world.total(n)) if self.data_parallel else n

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over what every rank computed of one global quantity (rows or features)."""
        return self.world.sum_(value.detach().clone()) if self.world.several and (self.data_parallel or
                                                                                     self.sharded) else value.detach()

    def activate(self, sae: SAE, pre: torch.Tensor, n_global: int) -> torch.Tensor:
        """Training-time features: a top-k whose threshold is global over the ranks' shares."""
        if not self.world.several or self.kind in ("relu", "jumprelu"):
            return sae.activate(pre, training=True)
        if self.kind == "topk":
            if not self.sharded:
                return sae.activate(pre, training=True)
            cut = self.world.kth_largest(pre, self.k)
            return torch.relu(pre) * (pre >= cut[:, None])
        flat = torch.relu(pre).flatten()
        count = min(self.k * n_global, self.width * n_global if self.sharded else flat.numel() * self.world.size)
        cut = self.world.kth_largest(flat[None], count)[0]
        return torch.where(torch.relu(pre) >= cut, torch.relu(pre), torch.zeros_like(pre))

    def whole(self, sae: SAE) -> SAE:
        """The whole SAE from every rank's shard (features), on every rank; else itself."""
        if not self.sharded:
            return sae
        # Assembled in host memory, one rank's shard at a time: the whole may not fit one device.
        whole = SAE(sae.d_in, self.d_sae, kind=sae.kind, k=self.k, site=sae.site, name=sae.name, model=sae.model)
        with torch.no_grad():
            for name, parameter in whole.named_parameters():
                if name in FEATURE_AXIS:
                    parameter.copy_(_whole(self, name, getattr(sae, name)))
        return whole


def _step(sae: SAE, x: torch.Tensor, plan: _Plan, optimizer, last_fired, dead_tokens: int, state: dict,
          l1: float, k, scale: float) -> dict:
    """One training step on this rank's rows `x` (scaled); returns what the loop logs and uses."""
    world = plan.world
    n = plan.count(len(x))
    b_dec = world.reduce_gradient(sae.b_dec) if plan.sharded else sae.b_dec
    pre = (x - b_dec) @ sae.W_enc + sae.b_enc
    features = plan.activate(sae, pre, n)
    if sae.kind == "jumprelu":
        features = jumprelu_ste(pre, sae.threshold)
    partial = features @ sae.W_dec
    x_hat = (world.sum_keep_gradient(partial) if plan.sharded else partial) + sae.b_dec
    mse = (x_hat - x).pow(2).sum() / n
    penalty = torch.zeros((), device=x.device)
    aux = torch.zeros((), device=x.device)
    fired = (features > 0).any(0)
    if plan.data_parallel:
        fired = world.max_(fired.to(torch.int32)).bool()
    last_fired.copy_(torch.where(fired, torch.zeros_like(last_fired), last_fired + n))
    dead = last_fired >= dead_tokens
    any_dead = bool(plan.total(dead.sum().float()) > 0) if plan.sharded else bool(dead.any())
    if sae.kind == "relu":
        penalty = l1 * (features * sae.W_dec.norm(dim=-1)).sum() / n
    elif sae.kind == "jumprelu":
        penalty = l1 * step_ste(pre, sae.threshold).sum() / n
    elif any_dead:
        aux = aux_loss(sae.W_dec, pre, x - x_hat.detach(), dead, k or 32, plan, n)
    loss = mse + penalty + aux / 32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if plan.data_parallel:
        _sum_gradients(sae, world)
    if sae.kind != "relu":
        remove_parallel_gradient(sae.W_dec)
    optimizer.step()
    with torch.no_grad():
        if sae.kind != "relu":
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        if sae.kind == "jumprelu":
            sae.threshold.clamp_(min=1e-4)
        if sae.kind == "batchtopk":
            positive = features[features > 0]
            smallest = positive.min() if positive.numel() else torch.tensor(float("inf"), device=x.device)
            if world.several:
                smallest = world.min_(smallest.detach().reshape(1).clone())[0]
            if torch.isfinite(smallest):
                state["threshold_sum"] += smallest.item()
                state["threshold_count"] += 1
                sae.threshold.fill_(state["threshold_sum"] / state["threshold_count"])
        # Logged figures, over the global batch and every feature.
        l0 = float(plan.total((features > 0).float().sum().reshape(1))[0]) / n
        dead_count = plan.total(dead.float().sum().reshape(1))[0] if plan.sharded else dead.float().sum()
        error, mean, squares = (x_hat - x).pow(2).sum(), x.sum(0), x.pow(2).sum()
        if plan.data_parallel:
            error, mean, squares = (world.sum_(t.detach().clone()) for t in (error, mean, squares))
        fvu = float(error / (squares - mean.pow(2).sum() / n))  # over deviations from the global mean
        if plan.data_parallel:
            loss_value, mse_value = (float(plan.total(t.detach().reshape(1))[0]) for t in (loss, mse))
        else:
            # Sharded features: the reconstruction is whole on every rank, a penalty is a sum over features.
            loss_value = float(loss - penalty) + float(plan.total(penalty.detach().reshape(1))[0])
            mse_value = float(mse)
    return {"n": n, "x_hat": x_hat.detach(), "dead_mask": dead,
            "log": {"loss": loss_value, "mse": mse_value / scale ** 2, "aux": float(aux.detach()), "l0": l0, "fvu": fvu,
                    "dead": float(dead_count) / plan.d_sae}}


def _sum_gradients(sae: SAE, world) -> None:
    """Every rank's gradients summed, in one flat all-reduce (each rank's loss is its rows' share
    of the global batch's, so the sum is the global batch's gradient)."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    world.sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _initialise(sae: SAE, sample: torch.Tensor, init: str, seed: int, d_sae: int | None = None,
                features: slice | None = None) -> None:
    """Decoder rows random unit vectors (drawn for all `d_sae` features, then this shard's
    `features` kept: every number of ranks starts from the same SAE), the encoder their
    transpose, the decoder bias the geometric median (or mean) of the sample."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    d_sae = d_sae or sae.d_sae
    features = features or slice(0, d_sae)
    with torch.no_grad():
        directions = torch.randn(d_sae, sae.d_in, generator=generator)[features].to(sample.device)
        sae.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        if init == "median":
            sae.b_dec.copy_(geometric_median(sample))
        elif init == "mean":
            sae.b_dec.copy_(sample.mean(0))
        else:
            raise SAEError(f"unknown init {init!r}: use 'median' or 'mean'")
        if sae.kind == "jumprelu":
            sae.threshold.fill_(0.001)


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """The geometric median of `points` (`n d`), by Weiszfeld's iterations."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=-1).clamp_min(1e-6)
        update = (weights[:, None] * points).sum(0) / weights.sum()
        if (update - median).norm() < 1e-6 * median.norm().clamp_min(1e-6):
            return update
        median = update
    return median


def aux_loss(W_dec: torch.Tensor, pre: torch.Tensor, error: torch.Tensor, dead: torch.Tensor,
             k: int, plan=None, n: int | None = None) -> torch.Tensor:
    """Auxiliary-k loss: dead features' top pre-activations, decoded by `W_dec` (`features d`),
    reconstruct the residual error `error` (`n d`). Over several ranks (`plan`), the top-k and
    the error's scale are global: over every rank's rows (ddp) or features (sharded)."""
    n = n or len(pre)
    sharded = plan is not None and plan.sharded
    dead_count = int(plan.total(dead.sum().reshape(1))[0]) if sharded else int(dead.sum())
    k_aux = min(dead_count, max(k * 2, 1), W_dec.shape[1] // 2)
    masked = torch.where(dead, pre, torch.full_like(pre, -float("inf")))
    if sharded:
        cut = plan.world.kth_largest(masked, k_aux)
        values = torch.where(masked >= cut[:, None], torch.relu(masked), torch.zeros_like(masked)).nan_to_num(0.0)
        reconstruction = plan.world.sum_keep_gradient(values @ W_dec)
    else:
        top = masked.topk(k_aux, dim=-1)
        values = torch.relu(top.values).nan_to_num(0.0)
        reconstruction = torch.zeros_like(pre).scatter(-1, top.indices, values) @ W_dec
    scale = error.pow(2).sum()
    if plan is not None and plan.data_parallel:
        scale = plan.world.sum_(scale.detach().clone())
    return (reconstruction - error).pow(2).sum() / n / (scale / n).clamp_min(1e-8)


def remove_parallel_gradient(W_dec: torch.Tensor) -> None:
    """Drop the gradient component along each unit decoder row (it would only change its norm)."""
    if W_dec.grad is not None:
        with torch.no_grad():
            rows = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            W_dec.grad -= (W_dec.grad * rows).sum(-1, keepdim=True) * rows


# Width of the rectangle kernel of JumpReLU's straight-through estimator, in the
# training units (inputs scaled to mean norm sqrt(d_in)); narrower kernels see too few
# pre-activations near the threshold to move it.
BANDWIDTH = 0.05


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold), with a rectangle-kernel gradient for the threshold."""

    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        width = BANDWIDTH
        near = ((pre - threshold).abs() < width / 2).to(pre)
        return grad * (pre > threshold), (-(threshold / width) * near * grad).sum(tuple(range(grad.dim() - 1)))


class _Step(torch.autograd.Function):
    """H(pre - threshold), with a rectangle-kernel gradient for the threshold (the L0 term)."""

    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        width = BANDWIDTH
        near = ((pre - threshold).abs() < width / 2).to(pre)
        return torch.zeros_like(pre), (-(1.0 / width) * near * grad).sum(tuple(range(grad.dim() - 1)))


def jumprelu_ste(pre, threshold):
    return _JumpReLU.apply(pre, threshold)


def step_ste(pre, threshold):
    return _Step.apply(pre, threshold)


def _resample(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, optimizer, plan=None) -> None:
    """Point dead features at badly reconstructed inputs, and reset their optimiser state. Over
    several ranks the inputs are the global batch's and the draws the same on every rank (one
    seed), each rank taking the draws of its own dead features."""
    world = plan.world if plan is not None else None
    with torch.no_grad():
        if plan is not None and plan.data_parallel:
            x, x_hat = world.gather_uneven(x), world.gather_uneven(x_hat)
        losses = (x - x_hat).pow(2).sum(-1)
        mine = int(dead.sum())
        first = 0
        count = mine
        if plan is not None and plan.sharded:
            counts = world.gather(torch.tensor([mine], device=x.device)).tolist()
            first, count = sum(counts[:world.rank]), sum(counts)
        picks = torch.multinomial(losses / losses.sum(), count, replacement=True)[first:first + mine]
        directions = x[picks] - sae.b_dec
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        norms = sae.W_enc[:, alive].norm(dim=0)
        total, number = norms.sum(), torch.tensor(float(alive.sum()), device=x.device)
        if plan is not None and plan.sharded:
            total, number = world.sum_(total.reshape(1).clone())[0], world.sum_(number.reshape(1).clone())[0]
        enc_norm = total / number if number > 0 else torch.tensor(1.0, device=x.device)
        index = dead.nonzero().squeeze(-1)
        sae.W_dec[index] = directions
        sae.W_enc[:, index] = directions.T * enc_norm * 0.2
        sae.b_enc[index] = 0.0
        for parameter in (sae.W_dec, sae.W_enc, sae.b_enc):
            state = optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    if parameter is sae.W_enc:
                        state[key][:, index] = 0
                    else:
                        state[key][index] = 0


# The axis each trained parameter's features run along (None: every rank holds it whole).
FEATURE_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "threshold": 0, "b_dec": None}


def _whole(plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter (or its optimiser moments) whole, from every rank's shard, in host memory."""
    axis = FEATURE_AXIS[name]
    if not plan.sharded or axis is None:
        return tensor.detach().cpu()
    moved = tensor.detach().movedim(axis, 0).contiguous()
    return plan.world.assemble(moved).movedim(0, axis)


def _shard(plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole parameter."""
    axis = FEATURE_AXIS[name]
    return tensor if not plan.sharded or axis is None else tensor.narrow(axis, plan.features.start, plan.width)


def _save(folder: Path, settings: dict, sae: SAE, optimizer, plan, state: dict, last_fired, start) -> None:
    """The training state, whole whatever the number of ranks (rank 0 writes; the others wait)."""
    from safetensors.torch import save_file

    tensors, adam_steps = {}, {}
    for name, parameter in sae.named_parameters():
        if name not in FEATURE_AXIS:
            continue
        tensors[name] = _whole(plan, name, parameter).cpu().contiguous()
        moments = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"adam.{name}.{key}"] = _whole(plan, name, moments[key]).cpu().contiguous()
        if "step" in moments:
            adam_steps[name] = float(moments["step"])
    tensors["last_fired"] = _whole(plan, "b_enc", last_fired).cpu().contiguous()
    tensors["rng"] = torch.get_rng_state()
    with plan.world.main_writes() as main:
        if main:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(folder / "sae_training.safetensors"))
            record = {**{key: value for key, value in state.items()}, "settings": settings,
                      "seconds": time.perf_counter() - start, "adam_steps": adam_steps}
            (folder / "sae_training.json").write_text(json.dumps(record))


def _resume(folder: Path, settings: dict, sae: SAE, optimizer, plan, device):
    """The state `_save` wrote, this rank's shard of it loaded into `sae` and `optimizer`."""
    from safetensors.torch import load_file

    record = json.loads((folder / "sae_training.json").read_text())
    if record["settings"] != json.loads(json.dumps(settings)):
        changed = [key for key in settings if record["settings"].get(key) != json.loads(json.dumps(settings[key]))]
        raise SAEError(f"{folder} holds an SAE training run with other settings ({', '.join(changed)} differ): train "
                       "with the same arguments to resume it, or use another checkpoint directory")
    tensors = load_file(str(folder / "sae_training.safetensors"))
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name not in FEATURE_AXIS:
                continue
            parameter.copy_(_shard(plan, name, tensors[name]).to(device))
            if f"adam.{name}.exp_avg" in tensors:
                optimizer.state[parameter] = {
                    "step": torch.tensor(record["adam_steps"][name]),
                    "exp_avg": _shard(plan, name, tensors[f"adam.{name}.exp_avg"]).to(device).clone(),
                    "exp_avg_sq": _shard(plan, name, tensors[f"adam.{name}.exp_avg_sq"]).to(device).clone()}
    torch.set_rng_state(tensors["rng"])
    state = {key: record[key] for key in ("step", "tokens", "epoch", "batch", "history", "threshold_sum",
                                          "threshold_count", "seconds")}
    return state, _shard(plan, "b_enc", tensors["last_fired"]).to(device).clone()


def _fold_scale(sae: SAE, scale: float) -> None:
    """Make an SAE trained on `x * scale` read and write raw `x`."""
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
