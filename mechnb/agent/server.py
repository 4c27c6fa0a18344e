"""An MCP server on a live model: the toolbox's experiments as typed tools, over stdio or HTTP.

    %mechnb serve                                   # in a notebook: the kernel's model, over HTTP
    python -m mechnb.mcp --model embedded           # alone, over stdio (what a client launches)
    python -m mechnb.mcp --model embedded --http    # alone, over HTTP on 127.0.0.1

It speaks the Model Context Protocol through the official SDK (`mcp` on PyPI, its low-level
`Server`): `tools/list` gives every tool of `mechnb.agent.tools` with its JSON schema,
`tools/call` runs one (results as JSON text and structured content; a failure as one line with
`isError`), and figures a call drew are PNG resources (`resources/list`, `resources/read`).

Safe by default:
- HTTP binds 127.0.0.1 (or ::1) only, refuses requests from any other address, and requires the
  token printed at start (`Authorization: Bearer <token>`): another user of the machine, or a
  web page the browser opens, cannot drive the model;
- no tool runs code unless the server starts with `allow_exec=True` (`--allow-exec`);
- every call is scoped, bounded in size and time, and leaves the model clean after an error
  (`mechnb.agent.tools`).
"""

from __future__ import annotations

import base64
import hmac
import html
import json
import secrets
import threading

from ..core.errors import AgentError
from .tools import Toolbox

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def prepare_anyio() -> None:
    """Import the anyio modules whose classes check their own attributes, with nnsight's `.save`
    taken off every object meanwhile. nnsight mounts `save` on `object` (so that `x.save()`
    works in traces); anyio's `TypedAttributeSet` refuses a subclass with a public attribute it
    did not annotate, and would see `save` on the classes the MCP SDK's transports import.
    `import mechnb.agent` runs it; code that imports `mcp` itself after nnsight should import
    `mechnb.agent` first."""
    import importlib
    import sys

    needed = ("anyio.abc._sockets", "anyio.streams.file", "anyio.streams.tls")
    if all(name in sys.modules for name in needed):
        return
    mounted = "nnsight" in sys.modules and hasattr(object, "save")
    if mounted:
        from nnsight import save
        from nnsight._c import mount, unmount

        unmount("save")
    try:
        for name in needed:
            importlib.import_module(name)
    finally:
        if mounted:
            mount(save, "save")


def build(toolbox: Toolbox, name: str = "mechnb"):
    """The MCP SDK's low-level `Server` over `toolbox`."""
    prepare_anyio()
    import anyio
    from mcp.server.lowlevel import Server
    from mcp_types import (BlobResourceContents, CallToolResult, ListResourcesResult, ListToolsResult,
                           ReadResourceResult, Resource, TextContent, Tool)

    async def list_tools(ctx, params):
        return ListToolsResult(tools=[Tool(name=s["name"], description=s["description"], input_schema=s["input_schema"])
                                      for s in toolbox.schemas()])

    async def call_tool(ctx, params):
        try:
            result = await anyio.to_thread.run_sync(toolbox.call, params.name, dict(params.arguments or {}))
        except AgentError as error:
            return CallToolResult(content=[TextContent(type="text", text=str(error))], is_error=True)
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(result))],
                              structured_content=result)

    async def list_resources(ctx, params):
        return ListResourcesResult(resources=[Resource(uri=uri, name=uri.rsplit("/", 1)[-1], mime_type="image/png")
                                              for uri in toolbox.figures])

    async def read_resource(ctx, params):
        uri = str(params.uri)
        if uri not in toolbox.figures:
            raise AgentError(f"no figure {uri}: the figures are {sorted(toolbox.figures) or 'none yet'}")
        blob = base64.b64encode(toolbox.figures[uri]).decode()
        return ReadResourceResult(contents=[BlobResourceContents(uri=uri, mime_type="image/png", blob=blob)])

    model = toolbox.model
    return Server(name, version=_version(),
                  instructions=f"Experiments on {model.name} ({model.n_layers} layers, {model.n_heads} heads): "
                               "each tool is one mechnb call; sites are written like resid_post.12, head.9.6, "
                               "mlp_out.*, head.*.*@-1.",
                  on_list_tools=list_tools, on_call_tool=call_tool, on_list_resources=list_resources,
                  on_read_resource=read_resource)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mechnb")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0"


def serve_stdio(toolbox: Toolbox) -> None:
    """Serve over this process's stdin and stdout until the client closes them."""
    prepare_anyio()
    import anyio
    from mcp.server.stdio import stdio_server

    server = build(toolbox)

    async def main():
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)


class _Guard:
    """ASGI middleware: requests from loopback addresses only, each with the bearer token."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            client = (scope.get("client") or ("", 0))[0]
            if client not in LOOPBACK:
                return await self._refuse(send, 403, f"requests come from 127.0.0.1 only, not {client}")
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await self._refuse(send, 401, "missing or wrong token: send Authorization: Bearer <the token "
                                                     "the server printed at start>")
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, status: int, message: str):
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class HTTPServer:
    """The server over streamable HTTP on 127.0.0.1, in a background thread (a notebook's kernel
    keeps running cells). `url`, `token` and `config()` (a client's JSON) say how to connect;
    `stop()` ends it."""

    def __init__(self, toolbox: Toolbox, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        import uvicorn

        if host not in LOOPBACK:
            raise AgentError(f"the MCP server binds to 127.0.0.1 or ::1 only (a token is not enough against the "
                             f"network), got host={host!r}")
        self.toolbox, self.token = toolbox, token or secrets.token_urlsafe(24)
        app = build(toolbox).streamable_http_app(streamable_http_path="/mcp", host=host)
        config = uvicorn.Config(_Guard(app, self.token), host=host, port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="mechnb-mcp", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise AgentError(f"the MCP server could not start on {host}:{port} (is the port taken?)")
            self._thread.join(0.02)
        bound = self._server.servers[0].sockets[0].getsockname()
        self.host, self.port = host, bound[1]
        self.url = f"http://{'[::1]' if host == '::1' else host}:{self.port}/mcp"

    def config(self, name: str = "mechnb") -> dict:
        """What an MCP client's settings hold to reach this server (Claude Code's `.mcp.json`, ...)."""
        return {"mcpServers": {name: {"type": "http", "url": self.url,
                                      "headers": {"Authorization": f"Bearer {self.token}"}}}}

    def client(self):
        """The MCP SDK's client of this server, with the token: `async with server.client() as c:`
        (in a notebook cell, top-level `await` works). Reads wait up to 300 s, as the SDK's own
        default client does: a first call that imports and warms up takes seconds."""
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {self.token}"},
                                  timeout=httpx2.Timeout(30.0, read=300.0))
        return Client(streamable_http_client(self.url, http_client=http))

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def html(self) -> str:
        """Where the server is and how a client connects: its URL, token and settings."""
        tools = ", ".join(sorted(self.toolbox.tools()))
        settings = html.escape(json.dumps(self.config(), indent=1))
        return (f"<div class='mechnb-mcp'><b>MCP server on {html.escape(self.toolbox.model.name)}</b>: "
                f"<code>{html.escape(self.url)}</code>, token <code>{html.escape(self.token)}</code> "
                f"(127.0.0.1 only).<br/>Tools: {html.escape(tools)}.<br/>A client's settings (Claude Code's "
                f"<code>.mcp.json</code>, Claude Desktop's config):<pre>{settings}</pre></div>")

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<mechnb MCP server on {self.url}, {state}, {len(self.toolbox.log)} calls>"


class CallLog:
    """The calls a client made, as a table that a notebook display updates as each ends
    (`handle`: the display's handle; `add` is the toolbox's `on_call`)."""

    def __init__(self, rows: int = 30):
        self.calls, self.rows, self.handle = [], rows, None

    def add(self, call) -> None:
        self.calls.append(call)
        if self.handle is not None:
            from IPython.display import HTML

            self.handle.update(HTML(self.html()))

    def html(self) -> str:
        def short(value, n=120):
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            return html.escape(text if len(text) <= n else text[: n - 3] + "...")

        lines = []
        for call in self.calls[-self.rows:]:
            outcome = f"<span style='color:#b00'>{short(call.error)}</span>" if call.error else short(call.result)
            lines.append(f"<tr><td>{call.id}</td><td><b>{html.escape(call.tool)}</b></td>"
                         f"<td><code>{short(call.arguments)}</code></td><td>{outcome}</td>"
                         f"<td>{call.seconds:.2f} s</td></tr>")
        body = "".join(lines) or "<tr><td colspan='5'>no calls yet</td></tr>"
        return ("<table class='mechnb-mcp-log'><tr><th>#</th><th>tool</th><th>arguments</th><th>result</th>"
                f"<th>time</th></tr>{body}</table>")
