"""Attribution graphs over transcoders (Ameisen et al. 2025, "Circuit Tracing").

    >>> g = model.graph("The Eiffel Tower is located in the city of", tcs)
    >>> g.scores, g.top(20), g.plot()

The pieces: `replacement` (the prompt's frozen, linear replacement model and its two
directions), `build` (nodes, targets, batched edges), `prune` (influence, pruning,
scores), `graph` (`AttributionGraph`: tables, checks, JSON), `plot` (the static figure).
"""

from .build import build
from .graph import AttributionGraph

__all__ = ["build", "AttributionGraph"]
