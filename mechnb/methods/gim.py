"""GIM's backward rules (Gradient Interaction Modifications, Edin et al. 2025), as a context.

Plain gradients through a transformer are poor attributions: they ignore interactions
that saturate the softmax and double-count paths through norms and gates. GIM keeps
the forward pass and changes only the backward pass:

- norms: LayerNorm / RMSNorm statistics (mean, scale) are treated as constants;
- attention: the softmax's gradient is that of softmax(scores / T) (T =
  `softmax_temperature`), and gradients into queries, keys and values are multiplied by
  `q_scale`, `k_scale`, `v_scale`;
- gated MLPs (SwiGLU / GeGLU): gradients into the gate and up branches are multiplied
  by `gate_scale`, `up_scale`.

    >>> with model.gim():
    ...     logits = model.hf(**inputs).logits      # same values as without
    ...     logits[0, -1, target].backward()        # GIM gradients

Every rule is `value.detach() + (rule(value) - rule(value).detach())`: the forward
value is the original (bit for bit), and the gradient is the rule's. The rules live
in mechnb's attention function (`mechnb.core.hookpoints`) and in PyTorch hooks on the norm
and gate modules, all removed when the block ends, however it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.arch import submodule
from ..core.devices import parameter
from ..core.engine import Run
from ..core.errors import AttributionError
from ..core.hookpoints import scale_gradient
from ..core.remote import local_only


@dataclass(frozen=True)
class GIMRules:
    """The settings of GIM's backward rules (1 / False turn a rule off)."""

    freeze_norm: bool = True
    softmax_temperature: float = 2.0
    q_scale: float = 0.25
    k_scale: float = 0.25
    v_scale: float = 0.5
    gate_scale: float = 0.5
    up_scale: float = 0.5


@local_only
def gim(model, freeze_norm: bool = True, softmax_temperature: float = 2.0, q_scale: float = 0.25,
        k_scale: float = 0.25, v_scale: float = 0.5, gate_scale: float = 0.5, up_scale: float = 0.5) -> "GIM":
    """`with model.gim():` GIM's backward rules on the live model; forward unchanged.

    Norm statistics frozen (`freeze_norm`), the attention softmax's gradient taken at
    temperature `softmax_temperature`, gradients into Q, K, V and the gated MLP's gate
    and up branches scaled (`*_scale`; 1 turns a rule off). Everything is restored when
    the block ends. Example: `with model.gim(): logits[0, -1, target].backward()`.
    """
    return GIM(model, GIMRules(freeze_norm, softmax_temperature, q_scale, k_scale, v_scale,
                               gate_scale, up_scale))


class GIM:
    """`with model.gim(...):` GIM's backward rules active on the live model (see module doc)."""

    def __init__(self, model, rules: GIMRules):
        for name in ("softmax_temperature", "q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"):
            value = getattr(rules, name)
            # A bad number would surface only inside a backward pass, as a torch error.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < float("inf"):
                raise AttributionError(f"{name} must be a finite number, got {value!r}")
        if rules.softmax_temperature <= 0:
            raise AttributionError(f"softmax_temperature must be positive, got {rules.softmax_temperature}")
        self.model, self.rules = model, rules
        self._installed = Run(model)

    def __enter__(self) -> GIMRules:
        model, rules, installed = self.model, self.rules, self._installed
        try:
            for layer in submodule(model.hf, model.arch.layers):
                installed.attach(submodule(layer, model.arch.attn), "mechnb_gim", rules)
                for path, scale in ((model.arch.mlp_gate, rules.gate_scale), (model.arch.mlp_up, rules.up_scale)):
                    if path is not None and scale != 1:
                        installed.torch_hook(submodule(layer, path),
                                             lambda module, args, output, scale=scale: scale_gradient(output, scale))
            if rules.freeze_norm:
                offsets: dict[int, float] = {}
                for module in model.hf.modules():
                    if _is_norm(module):
                        installed.torch_hook(
                            module, lambda m, args, kwargs, output: _frozen_norm(m, args, kwargs, output, offsets),
                            with_kwargs=True)
        except BaseException:
            installed.close()
            raise
        return rules

    def __exit__(self, *exc) -> None:
        self._installed.close()


def _is_norm(module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _frozen_norm(module, args, kwargs, output, offsets: dict):
    """The norm's output, with the gradient of the norm whose statistics are constants."""
    # The input as the caller passed it: accelerate (device_map) may have computed the
    # output on another device, and offloaded the weight again (read it via `parameter`).
    x = (args[0] if args else next(iter(kwargs.values()))).to(output.device)
    centre = isinstance(module, torch.nn.LayerNorm)
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6
    xf = x.float()
    mean = xf.mean(-1, keepdim=True).detach() if centre else 0.0
    spread = (xf - mean).pow(2).mean(-1, keepdim=True) if centre else xf.pow(2).mean(-1, keepdim=True)
    scale = torch.rsqrt(spread + eps).detach()
    weight = parameter(module, "weight", output.device)
    gain = 1.0 if weight is None else weight.float()
    if weight is not None and id(module) not in offsets:
        # Gemma's RMSNorm multiplies by (1 + weight): tell which from the module's output.
        plain = (xf - mean) * scale * weight.float()
        bias = parameter(module, "bias", output.device)
        if bias is not None:
            plain = plain + bias.float()
        offsets[id(module)] = 0.0 if torch.allclose(plain, output.float(), atol=1e-4, rtol=1e-3) else 1.0
    if weight is not None:
        gain = gain + offsets[id(module)]
    linear = ((xf - mean) * scale * gain).to(output.dtype)
    return output.detach() + (linear - linear.detach())
