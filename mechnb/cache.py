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
"""

from __future__ import annotations

import torch

from .errors import SiteError
from .sites import Site, parse
from .trace import read_value


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
