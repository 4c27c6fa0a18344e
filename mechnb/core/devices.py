"""Devices: where a model's weights and values live when it is spread over several.

The problem: `mechnb.load(name, device_map="auto")` lets accelerate place each layer
on its own GPU, on the CPU, or offload it to disk. accelerate's `AlignDevicesHook`s
then move each module's *inputs* to that module's execution device, and an offloaded
module's weights exist only during its own forward: between forwards they sit on the
`meta` device, with no data. The model runs; tensors of our own must follow the same
rules, and this module is how:

- inputs go to the device of the embedding (`input_device`, which is `Model.device`);
- a value written into the model (a patch, an ablation's reference values, a steering
  vector) is moved to the device of the value it replaces, where it is written
  (`.to(part)` in `mechnb.core.interventions`, `assign_part` in `mechnb.core.trace`);
- a weight read outside a forward (lens, DLA, circuits, weight analyses) is read
  through `parameter`, which loads an offloaded weight onto its execution device;
- values gathered from several layers (a cache, a range of sites, a sum over heads)
  are moved to one device, the input device (`gather`).

Example:
    >>> model = mechnb.load("org/big-model", device_map="auto", offload_folder="offload")
    >>> model.devices                       # every execution device, in layer order
    ['cuda:0', 'cuda:1', 'disk']
    >>> w = parameter(submodule(model.hf, "lm_head"))   # real data, even when offloaded

Gotchas: PyTorch forward hooks run after accelerate has offloaded a module's weights
again, so a hook that needs a weight reads it through `parameter` too. Writing an
offloaded weight (a ROME edit) would change only a temporary copy, so `offloaded`
lets such methods refuse.
"""

from __future__ import annotations

import torch


def _hook(module):
    """The accelerate hook on `module` that places it, or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    # A SequentialHook wraps several hooks; the one with an execution device places it.
    for inner in getattr(hook, "hooks", None) or (hook,):
        if getattr(inner, "execution_device", None) is not None:
            return inner
    return None


def execution_device(module) -> torch.device | None:
    """The device `module` computes on: accelerate's execution device, else that of its
    first parameter or buffer with data, else None."""
    for each in module.modules():
        hook = _hook(each)
        if hook is not None:
            return torch.device(hook.execution_device)
        for tensor in (*each.parameters(recurse=False), *each.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
    return None


def input_device(hf_model) -> torch.device:
    """The device inputs go to: the embedding's execution device (CPU when none has data)."""
    return execution_device(hf_model.get_input_embeddings()) or execution_device(hf_model) \
        or torch.device("cpu")


def is_offloaded(module) -> bool:
    """True when accelerate keeps some of `module`'s weights off-device between forwards."""
    return any(getattr(_hook(each), "offload", False) for each in module.modules())


def parameter(module, name: str = "weight", device=None) -> torch.Tensor | None:
    """`module.<name>` with its data (None if absent), on `device` if given, else where
    the module keeps it.

    An offloaded weight is loaded for the call and returned as a detached copy on the
    module's execution device; any other is returned as it is when already on `device`
    (so gradients and in-place edits still reach it).
    """
    value = getattr(module, name, None)
    if value is not None and value.device.type == "meta":
        from accelerate.utils import align_module_device, has_offloaded_params

        if has_offloaded_params(module):
            with align_module_device(module):
                value = getattr(module, name).detach().clone()
    return value if value is None or device is None else value.to(device)


def devices(hf_model) -> list[str]:
    """The devices the model's modules run on, in model order (`"disk"` for offloaded ones)."""
    placed = getattr(hf_model, "hf_device_map", None)
    if placed:
        found = [str(torch.device(d)) if isinstance(d, int) else str(d) for d in placed.values()]
    else:
        found = [str(execution_device(hf_model) or "cpu")]
    return list(dict.fromkeys(found))


def gather(tensors, device) -> list[torch.Tensor]:
    """The tensors, each moved to `device` (a no-op for those already there)."""
    return [tensor.to(device) for tensor in tensors]
