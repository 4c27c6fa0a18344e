"""A cache: the values of chosen sites from one run of the model, looked up by site string.

`Model.cache(prompts, sites)` runs once and stores each site whole (every head, every
position); a lookup applies the index and positions of the string you ask with, so
one run answers `cache["head.9"]`, `cache["head.9.6"]` and `cache["head.9.6@-1"]`.
Prompts are padded on the right; `cache.lengths` and `cache.tokens` say where each
prompt's real tokens end, and position syntax (`@-1`) counts real tokens.

Example:
    >>> cache = model.cache(["The cat sat", "Hello"], "resid_post.*")
    >>> cache["resid_post.*@-1"].shape     # layer batch d_model (each prompt's last token)
    torch.Size([30, 2, 576])

Many prompts run in chunks (`batch_size`), each chunk's values moving to CPU as it
finishes, so the GPU holds one chunk's activations; a chunk that runs out of memory
is halved and run again (`mechnb.core.memory`). Every chunk is padded as long as the
whole batch, so the values equal those of one run.
"""

from __future__ import annotations

import torch

from .batch import Batch
from .errors import SiteError
from .sites import Site, parse
from .trace import batch_of, read_value


def cache(model, prompts, sites, batch_size=None) -> "Cache":
    """Run the model on `prompts` and keep `sites`; see `Model.cache` for the arguments.

    `batch_size` may also be a `mechnb.core.memory.Chunks` shared by several calls.
    """
    from .memory import Chunks

    # Anything but a collection is one site, which `parse` checks (None, 5: a SiteError).
    wanted = list(sites) if isinstance(sites, (list, tuple, set, frozenset)) else [sites]
    if not wanted:
        raise SiteError("cache needs at least one site, e.g. model.cache(prompt, 'resid_post.5')")
    whole = {}
    for site in wanted:
        for concrete in parse(site).expand(model):
            whole[concrete.base.name] = concrete.base
    order = sorted(whole.values(), key=lambda s: s.order)
    if model.remote:
        from .remote import check_site

        for site in order:
            check_site(site)  # before anything is sent
    batch = batch_of(model, prompts)
    chunks = batch_size if isinstance(batch_size, Chunks) else Chunks(
        batch_size, "model.cache", "prompts", advice="cache fewer sites (each `resid_pre.*` is every layer)")

    def run(rows):
        values = _run(model, batch.select(rows) if len(rows) < len(batch) else batch, order)
        # In several chunks, each moves to CPU as it finishes: the device holds one chunk.
        return values if len(rows) == len(batch) else {name: v.cpu() for name, v in values.items()}

    parts = [values for _, values in chunks.run(run, range(len(batch)))]
    if len(parts) == 1:
        return Cache(model, batch, parts[0])
    return Cache(model, batch, {name: torch.cat([part[name] for part in parts]) for name in parts[0]})


def _run(model, batch: Batch, order: list[Site]) -> dict[str, torch.Tensor]:
    """One trace of `batch` keeping the whole value of each base site, in execution order,
    gathered on the input device (layers spread by `device_map` compute on several)."""
    import nnsight

    store = {}
    with model.trace(batch) as trace:
        for site in order:
            store[site.name] = model[site].save()
        # Saved as a whole so that a remote run (mechnb.core.remote) sends the dict back.
        nnsight.save(store)
        if order[-1].kind != "logits" and order[-1].name != "output" and not model.remote:
            # Nothing later is kept: the rest of the layers and the unembedding (for
            # SmolLM2, 49,152 logits a token, the largest tensor of a run) never run.
            trace.stop()
    device = model.device
    return {name: value.detach().to(device) for name, value in store.items()}


class Cache:
    """Site values of one run (see the module docstring).

    Attributes:
        batch: the tokenized prompts (`tokens`, `lengths`, `attention_mask`).
    """

    def __init__(self, model, batch, values: dict[str, torch.Tensor]):
        self.model = model
        self.batch = batch
        self._values = values

    @property
    def prompts(self) -> list[str]:
        return self.batch.prompts

    @property
    def tokens(self) -> list[list[str]]:
        """Each prompt's token strings (without padding)."""
        return self.batch.tokens

    @property
    def lengths(self) -> list[int]:
        """Each prompt's number of real tokens."""
        return self.batch.lengths

    @property
    def attention_mask(self) -> torch.Tensor:
        """`batch pos`: 1 for real tokens, 0 for right padding."""
        return self.batch.attention_mask

    def keys(self) -> list[str]:
        """The stored sites, in execution order."""
        return list(self._values)

    def __contains__(self, site) -> bool:
        try:
            self[site]
        except SiteError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, site) -> torch.Tensor:
        values = []
        for concrete in parse(site).expand(self.model):
            base = concrete.base.name
            if base not in self._values:
                raise SiteError(
                    f"{concrete} is not in this cache, which holds {', '.join(self._values)}: "
                    f"add it to the sites of model.cache(...)"
                )
            values.append(read_value(self._values[base], concrete, self.batch))
        return values[0] if len(values) == 1 else torch.stack(values)

    def __repr__(self) -> str:
        return f"<mechnb.Cache {len(self.prompts)} prompt(s), sites: {', '.join(self._values)}>"
