"""Weight edits: changes to a model's weights that can be undone, bit for bit.

A method that rewrites weights (ROME, `mechnb.methods.rome`) does not write them itself:
it hands an edit (an object with `.module` and `.delta`) to the model's registry,
`model.weight_edits`, which keeps each edited module's weight from before its first
active edit and rebuilds the weight from it whenever an edit comes or goes.

    >>> model.weight_edits.apply(edit)      # edit.module.weight += edit.delta
    >>> model.edits                         # the active edits, oldest first
    >>> model.weight_edits.revert(edit)     # the weight as if the edit never happened

Gotcha: an edit to a module that accelerate offloads (a `device_map` with CPU or disk)
would change a temporary copy only; the methods refuse those (`devices.is_offloaded`).
"""

from __future__ import annotations


class WeightEdits:
    """The active weight edits of one model, stacked per module.

    An edit is any object with `.module` (a module with a `weight`) and `.delta` (added
    to that weight). `apply` adds one; `revert` removes one and rebuilds its module's
    weight from the weight before the first active edit plus the deltas still active,
    in order: reverting in any order leaves the others, and reverting all restores the
    original weights bit for bit.
    """

    def __init__(self):
        self._active: list = []
        self._base: dict = {}  # id(module) -> its weight before the first active edit

    def __iter__(self):
        return iter(list(self._active))

    def __len__(self) -> int:
        return len(self._active)

    def apply(self, edit) -> None:
        """Activate `edit`: its module's weight gains its delta."""
        if id(edit.module) not in self._base:
            self._base[id(edit.module)] = edit.module.weight.detach().clone()
        self._active.append(edit)
        self._rebuild(edit.module)

    def revert(self, edit) -> None:
        """Deactivate `edit` (the others stay)."""
        self._active.remove(edit)
        self._rebuild(edit.module)

    def _rebuild(self, module) -> None:
        import torch

        base = self._base[id(module)]
        weight = base.clone()
        remaining = [e for e in self._active if e.module is module]
        for each in remaining:
            weight += each.delta
        with torch.no_grad():
            module.weight.copy_(weight if remaining else base)
        if not remaining:
            del self._base[id(module)]
