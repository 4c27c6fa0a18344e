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
import math
import time

import torch

from ..core.checks import is_int
from ..core.errors import SAEError
from .model import KINDS, SAE


def train(store, kind: str = "topk", d_sae: int | None = None, k: int | None = None,
          l1: float | None = None, lr: float | None = None, batch_size: int = 4096,
          steps: int | None = None, seed: int = 0, device=None, epochs: float = 1.0,
          init: str = "median", dead_tokens: int | None = None, log_every: int = 10,
          progress: bool = True, name: str = "sae") -> SAE:
    """Train an SAE on `store` (an `ActivationStore` or a `tokens d_in` tensor); see module doc.

    Args:
        kind: topk, batchtopk, relu or jumprelu.
        d_sae: number of features (default 8 x d_in).
        k: active features per token (topk, batchtopk).
        l1: sparsity coefficient (relu: L1, default 1.5; jumprelu: L0, default 0.1).
        lr: Adam learning rate (default 4e-4).
        batch_size, steps, epochs: tokens per step; steps default to `epochs` passes.
        seed: makes initialisation and data order reproducible.
        device: where to train (default: cuda when available).
        init: `median` (geometric median) or `mean` for the decoder bias.
        dead_tokens: a feature is dead after this many tokens without firing
            (default min(1M, a quarter of training)).

    Returns:
        The trained `SAE`; `.history` (DataFrame: step, tokens, loss, mse, aux, l0,
        fvu, dead, lr, seconds) and `.meta` (tokens seen, passes, interrupted).
    """
    import pandas as pd

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
    for name, value in (("d_sae", d_sae), ("batch_size", batch_size), ("steps", steps)):
        if value is not None and (not is_int(value) or value < 1):
            raise SAEError(f"{name} must be a positive integer{'' if name == 'batch_size' else ' or None'}, "
                           f"got {value!r}")
    store.check()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    d_in = store.d
    d_sae = d_sae or 8 * d_in
    steps = steps or max(1, int(math.ceil(epochs * len(store) / batch_size)))
    total_tokens = steps * batch_size
    dead_tokens = dead_tokens or min(1_000_000, max(total_tokens // 4, batch_size))
    lr = lr or 4e-4
    if l1 is None:
        l1 = {"relu": 1.5, "jumprelu": 0.1}.get(kind, 0.0)

    sample = store.sample(min(len(store), 32_768), seed=seed).to(device)
    scale = math.sqrt(d_in) / sample.norm(dim=-1).mean().item()
    sae = SAE(d_in, d_sae, kind=kind, k=k, site=store.site, name=name, model=store.meta.get("model"), device=device)
    _initialise(sae, sample * scale, init, seed)
    optimizer = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999))
    decay_from = int(0.8 * steps)
    last_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    threshold_sum, threshold_count = 0.0, 0
    history, best_state, best_loss = [], None, float("inf")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"training {kind} SAE", unit="step", delay=2)
    tokens_seen, step, interrupted = 0, 0, False
    start = time.perf_counter()
    epoch = 0
    resample_at = {int(steps * f) for f in (0.25, 0.5, 0.75)} if kind == "relu" else set()
    try:
        while step < steps:
            for batch in store.batches(batch_size, seed=seed + epoch):
                if step >= steps:
                    break
                x = batch.to(device).float() * scale
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_from))
                pre = sae.pre(x)
                features = sae.activate(pre, training=True)
                if kind == "jumprelu":
                    features = jumprelu_ste(pre, sae.threshold)
                x_hat = sae.decode(features)
                mse = (x_hat - x).pow(2).sum(-1).mean()
                loss = mse
                aux = torch.zeros((), device=device)
                fired = (features > 0).any(0)
                last_fired = torch.where(fired, torch.zeros_like(last_fired), last_fired + len(x))
                dead = last_fired >= dead_tokens
                if kind == "relu":
                    loss = loss + l1 * (features * sae.W_dec.norm(dim=-1)).sum(-1).mean()
                elif kind == "jumprelu":
                    loss = loss + l1 * step_ste(pre, sae.threshold).sum(-1).mean()
                elif dead.any():
                    aux = aux_loss(sae.W_dec, pre, x - x_hat.detach(), dead, k or 32)
                    loss = loss + aux / 32
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if kind != "relu":
                    remove_parallel_gradient(sae.W_dec)
                optimizer.step()
                with torch.no_grad():
                    if kind != "relu":
                        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
                    if kind == "jumprelu":
                        sae.threshold.clamp_(min=1e-4)
                    if kind == "batchtopk":
                        positive = features[features > 0]
                        if positive.numel():
                            threshold_sum += positive.min().item()
                            threshold_count += 1
                            sae.threshold.fill_(threshold_sum / threshold_count)
                if step + 1 in resample_at and dead.any():
                    _resample(sae, x, x_hat.detach(), dead, optimizer)
                    last_fired[dead] = 0
                step += 1
                tokens_seen += len(x)
                if step % log_every == 0 or step == steps:
                    with torch.no_grad():
                        l0 = (features > 0).float().sum(-1).mean().item()
                        fvu = ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
                    row = {"step": step, "tokens": tokens_seen, "loss": loss.item(), "mse": mse.item() / scale ** 2,
                           "aux": aux.item(), "l0": l0, "fvu": fvu, "dead": dead.float().mean().item(),
                           "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
                    history.append(row)
                    if fvu < best_loss:
                        best_loss, best_state = fvu, copy.deepcopy(sae.state_dict())
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{l0:.1f}", fvu=f"{fvu:.3f}",
                                        dead=f"{row['dead']:.2f}")
                if bar is not None:
                    bar.update(1)
            epoch += 1
    except KeyboardInterrupt:
        interrupted = True
        if best_state is not None:
            sae.load_state_dict(best_state)
    finally:
        if bar is not None:
            bar.close()
    _fold_scale(sae, scale)
    sae.history = pd.DataFrame(history)
    sae.meta = {"tokens": tokens_seen, "steps": step, "passes": tokens_seen / len(store),
                "scale": scale, "interrupted": interrupted, "seed": seed, "lr": lr, "l1": l1,
                "batch_size": batch_size, "store_tokens": len(store), "site": store.site,
                "seconds": time.perf_counter() - start}
    sae.requires_grad_(False)
    return sae.eval()


def _initialise(sae: SAE, sample: torch.Tensor, init: str, seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        directions = torch.randn(sae.d_sae, sae.d_in, generator=generator).to(sample.device)
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
             k: int) -> torch.Tensor:
    """Auxiliary-k loss: dead features' top pre-activations, decoded by `W_dec` (`features d`),
    reconstruct the residual error `error` (`n d`)."""
    k_aux = min(int(dead.sum()), max(k * 2, 1), W_dec.shape[1] // 2)
    masked = torch.where(dead, pre, torch.full_like(pre, -float("inf")))
    top = masked.topk(k_aux, dim=-1)
    values = torch.relu(top.values).nan_to_num(0.0)
    reconstruction = torch.zeros_like(pre).scatter(-1, top.indices, values) @ W_dec
    return (reconstruction - error).pow(2).sum(-1).mean() / error.pow(2).sum(-1).mean().clamp_min(1e-8)


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


def _resample(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, optimizer) -> None:
    """Point dead features at badly reconstructed inputs, and reset their optimiser state."""
    with torch.no_grad():
        losses = (x - x_hat).pow(2).sum(-1)
        count = int(dead.sum())
        picks = torch.multinomial(losses / losses.sum(), count, replacement=True)
        directions = x[picks] - sae.b_dec
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
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


def _fold_scale(sae: SAE, scale: float) -> None:
    """Make an SAE trained on `x * scale` read and write raw `x`."""
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
