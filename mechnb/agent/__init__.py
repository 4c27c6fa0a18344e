"""Language models as meta-interpreters: the live model's experiments given to an LLM.

- `mechnb.agent.tools`: `Toolbox(model)`, one typed tool per API call (patch, path patch,
  ablate, steer, DLA, logit lens, heads, circuit, graph, SAE features, interchange, ...), each
  scoped, bounded, and answered as compact JSON with the API's own numbers;
- `mechnb.agent.server`: those tools as an MCP server (the official `mcp` SDK) over stdio or
  HTTP on 127.0.0.1 with a token: `%mechnb serve`, or `python -m mechnb.mcp`;
- `mechnb.agent.loop`: `investigate(question, model, llm=...)`, an investigation by any
  OpenAI-compatible endpoint (or a function) with the same tools, streamed into the cell, ending
  in a `Report` whose claims cite their calls and which `verify()` reruns.
"""

from .server import prepare_anyio
from .tools import LIMITS, TOOLS, Toolbox, result_json  # noqa: F401

prepare_anyio()  # before anything imports the MCP SDK in a process where nnsight runs (see there)
from .loop import Claim, Report, investigate  # noqa: F401,E402
