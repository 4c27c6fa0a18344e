"""Circuit discovery: score every edge of the model's graph from gradients, keep the top,
and measure how much of the behaviour the kept part carries.

    >>> circ = model.circuit(clean, corrupt, answer, wrong, method="eap-ig")
    >>> circ.top("2%").plot(); circ.faithfulness()

`graph` names the nodes and edges, `task` holds the prompt pairs and the metric,
`engine` runs the forwards (writer outputs, reader gradients, patched runs), `discover`
scores (`Model.circuit`), `circuit` holds the result.
"""

from ..core.errors import CircuitError
from .circuit import FRACTIONS, Circuit
from .discover import METHODS
from .graph import Graph
from .task import Task

__all__ = ["Circuit", "CircuitError", "FRACTIONS", "Graph", "METHODS", "Task"]
