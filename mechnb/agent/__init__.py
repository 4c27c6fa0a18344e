"""Language models as meta-interpreters: the live model's experiments given to an LLM.

- `mechnb.agent.tools`: `Toolbox(model)`, one typed tool per API call (patch, path patch,
  ablate, steer, DLA, logit lens, heads, circuit, graph, SAE features, interchange, ...), each
  scoped, bounded, and answered as compact JSON with the API's own numbers;
- `mechnb.agent.server`: those tools as an MCP server (the official `mcp` SDK) over stdio or
  HTTP on 127.0.0.1 with a token: `%mechnb serve`, or `python -m mechnb.mcp`.
"""

from .tools import LIMITS, TOOLS, Toolbox, result_json  # noqa: F401
