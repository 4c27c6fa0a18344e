"""`python -m mechnb.mcp`: an MCP server on a model, for a client that launches it (stdio) or
connects to it (`--http`, 127.0.0.1 with a token printed at start).

    python -m mechnb.mcp                               # the embedded SmolLM2, over stdio
    python -m mechnb.mcp --model gpt2 --http --port 8765
    python -m mechnb.mcp --allow-exec                  # also a tool that runs Python (off by default)

A client's configuration for the stdio server (Claude Desktop's `claude_desktop_config.json`,
Claude Code's `.mcp.json`):

    {"mcpServers": {"mechnb": {"command": "python", "args": ["-m", "mechnb.mcp"]}}}

Everything but the protocol goes to stderr: stdout is the protocol's channel.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechnb.mcp", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a hub id, a directory or a GGUF (default: the embedded model)")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP on 127.0.0.1 instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 or ::1 (nothing else is allowed)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=None, help="the HTTP token (default: a new random one, printed)")
    parser.add_argument("--allow-exec", action="store_true", help="offer a tool that runs Python in this process")
    parser.add_argument("--sae", action="append", default=[], help="an SAE directory (or hub release/id) for the "
                                                                   "features tool; may repeat")
    parser.add_argument("--transcoders", default=None, help="a transcoder set directory (or hub id) for the graph tool")
    args = parser.parse_args(argv)

    from . import MechnbError, load
    from .agent.server import HTTPServer, serve_stdio
    from .agent.tools import Toolbox

    try:
        model = load(args.model) if args.model else load()
        saes = [_sae(spec) for spec in args.sae]
        transcoders = None
        if args.transcoders:
            from .transcoders import load as load_transcoders

            transcoders = load_transcoders(args.transcoders)
        toolbox = Toolbox(model, allow_exec=args.allow_exec, saes=saes, transcoders=transcoders)
        if not args.http:
            print(f"mechnb MCP server on {model.name} over stdio", file=sys.stderr)
            serve_stdio(toolbox)
            return 0
        server = HTTPServer(toolbox, host=args.host, port=args.port, token=args.token)
    except MechnbError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"mechnb MCP server on {model.name}: {server.url}", file=sys.stderr)
    print(f"token: {server.token}", file=sys.stderr)
    print(json.dumps(server.config(), indent=1), file=sys.stderr, flush=True)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _sae(spec: str):
    """An SAE from a directory, or from the hub as `release/sae_id`."""
    from pathlib import Path

    from .sae import load

    if Path(spec).exists():
        return load(spec)
    release, _, sae_id = spec.partition("/")
    return load(release, sae_id)


if __name__ == "__main__":
    sys.exit(main())
