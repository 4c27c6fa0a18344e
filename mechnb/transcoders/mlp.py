"""Where a transcoder reads and writes in a model, and the values there over a batch.

A transcoder of layer L reads the input of the MLP (`mlp_in`) or of the norm before it
(`resid_mid`) and writes the MLP's output site (`mlp_out.L`); `mlp_values` runs a batch
and keeps both for several layers at once (what training and evaluation read).
"""

from __future__ import annotations

import torch


class _Stop(Exception):
    """Raised by a hook to end a forward once the last needed MLP has run."""


def read_path(model, layer: int, reads: str) -> str:
    """The path of the module whose input is what a transcoder of `layer` reads (`mlp_in`:
    the MLP; `resid_mid`: the norm before it)."""
    return f"{model.arch.layers}.{layer}.{model.arch.mlp if reads == 'mlp_in' else model.arch.mlp_norm}"


def read_module(model, layer: int, reads: str):
    """The module at `read_path`."""
    from ..core.arch import submodule

    return submodule(model.hf, read_path(model, layer, reads))


def write_module(model, layer: int):
    """The module whose output is `mlp_out` of `layer`."""
    from ..core.arch import submodule

    return submodule(submodule(model.hf, model.arch.layers)[layer], model.arch.mlp_out)


def mlp_values(model, layers: list[int], reads: str, ids: torch.Tensor, mask: torch.Tensor,
               stop: bool = True, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the MLPs of `layers` read and write on a padded batch, at the real positions after
    each window's first: `(inputs, outputs)`, each `layer tokens d` float32 on the model's device.
    With `stop`, the forward ends after the last of those MLPs; with `autocast`, the forward runs
    in bfloat16 (torch.autocast: matrix products in bf16, norms and the values kept in float32)."""
    import contextlib
    from ..core.engine import run

    keep_rows = mask.bool().clone()
    keep_rows[:, 0] = False  # the attention sink
    keep_rows = keep_rows.to(model.device)
    n = int(keep_rows.sum())
    # Written layer by layer as the forward computes them: no second copy of 2 x layers values.
    inputs = torch.empty(len(layers), n, model.d_model, device=model.device)
    outputs = torch.empty(len(layers), n, model.d_model, device=model.device)
    last = max(layers)

    def keep(store, i, end=False):
        def fn(value):
            store[i] = value.detach()[keep_rows]
            if end and stop:
                raise _Stop
        return fn

    with run(model, [[""] * ids.shape[1]] * len(ids)) as forward:
        for i, layer in enumerate(layers):
            forward.hook(read_module(model, layer, reads), "input", keep(inputs, i))
            forward.hook(write_module(model, layer), "output", keep(outputs, i, layer == last))
        mixed = torch.autocast(model.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        try:
            with mixed:
                model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
        except _Stop:
            pass
    return inputs, outputs
