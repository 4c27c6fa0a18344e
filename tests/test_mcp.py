"""The MCP server on a live model (`mechnb.agent`): real clients of the official `mcp` SDK over
HTTP (a server this test starts in-process) and stdio (`python -m mechnb.mcp` as a subprocess),
the tools' schemas read from the API, their numbers against the API's, and bad calls."""

import asyncio
import inspect
import json
import socket
import sys
import urllib.error
import urllib.request

import pytest
import torch

from conftest import PROMPT, clean_logits
from mechnb import AgentError

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def llama(tiny_factory):
    return tiny_factory("llama")


def run(coroutine):
    """Run `coroutine` to its end in a thread of its own: the worker's main thread may hold an
    event loop left by an earlier test (IPython's shell)."""
    import threading

    found = {}

    def main():
        try:
            found["value"] = asyncio.run(coroutine)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            found["error"] = error

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(300)
    if "error" in found:
        raise found["error"]
    return found["value"]


def client_for(server, token="yes"):
    """An SDK client of the HTTP server, with its token (or `token=None`: none, or a wrong one)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    if token == "yes":
        return server.client()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(streamable_http_client(server.url, http_client=httpx2.AsyncClient(headers=headers, timeout=60)))


def test_every_tool_schema_is_its_methods_signature_and_docstring(llama):
    from mechnb.agent.tools import TOOLS, Toolbox, _docstring_args
    from mechnb.model import Model

    schemas = {s["name"]: s for s in Toolbox(llama).schemas()}
    patch = schemas["patch"]
    assert patch["description"].startswith("Activation (or attribution) patching of every site in `sites`.")
    properties = patch["input_schema"]["properties"]
    documented = _docstring_args(Model.patch)
    assert properties["sites"]["description"] == documented["sites"] and "`head.*.*@-1`" in documented["sites"]
    assert properties["clean"]["description"] == documented["corrupt"] == documented["clean"]
    signature = inspect.signature(Model.patch)
    for name in ("metric", "method", "normalize", "direction", "per_position"):
        assert properties[name]["default"] == signature.parameters[name].default, name
    assert sorted(patch["input_schema"]["required"]) == ["clean", "corrupt", "sites"]
    assert schemas["top"]["input_schema"]["properties"]["k"] == {
        "type": "integer", "default": 10, "minimum": 1, "maximum": 50,
        "description": "how many rows to return (the k largest)."}
    for tool in TOOLS:  # every exposed argument is its method's, described
        parameters = inspect.signature(getattr(Model, tool.method)).parameters
        assert all(p in parameters for p in tool.params), tool.name
        if tool.name in schemas:
            assert all(e["description"] for e in schemas[tool.name]["input_schema"]["properties"].values()), tool.name
    # graph and features need what they read: offered only then
    assert "graph" not in schemas and "features" not in schemas and "exec" not in schemas


def test_bad_calls_are_one_line_and_leave_the_model_clean(llama):
    from mechnb.agent.tools import Toolbox

    before = clean_logits(llama)
    toolbox = Toolbox(llama, limits={"prompts": 4, "prompt_tokens": 40, "sites": 30})
    cases = [
        ("nope", {}, "no tool named 'nope'; the tools are ablate, cache_stats"),
        ("exec", {"code": "1"}, "exec is off: start the server with --allow-exec"),
        ("top", {"prompt": 3}, "top: prompt: 3 is not of type 'string'"),
        ("top", {"prompt": "x", "k": 500}, "top: k: 500 is greater than the maximum of 50"),
        ("top", {"prompt": "x", "bogus": 1}, "'bogus' was unexpected"),
        ("patch", {"clean": CLEAN, "corrupt": CORRUPT, "sites": "head.9.*", "answer": " Mary"},
         "patch: sites: layer 9 out of range in head.9.*"),
        ("patch", {"clean": CLEAN, "corrupt": CORRUPT, "sites": "neuron.*.*", "answer": " Mary"},
         "sites expand to 192 sites, more than the limit of 30"),
        ("patch", {"clean": [CLEAN] * 5, "corrupt": [CORRUPT] * 5, "sites": "head.*.*", "answer": " Mary"},
         "clean has 5 prompts, more than the limit of 4"),
        ("top", {"prompt": "word " * 60}, "a prompt of 61 tokens is longer than the limit of 40"),
        ("patch", {"clean": CLEAN, "corrupt": "Mary", "sites": "resid_pre.*", "answer": " Mary"}, "patch:"),
        ("ablate", {"sites": "head.1.1", "mode": "mean", "measure": CLEAN}, "ablate:"),
        ("graph", {"prompt": "x"}, "tool graph is not available: no transcoder set was given to the server or is attached"),
    ]
    for name, arguments, text in cases:
        with pytest.raises(AgentError) as raised:
            toolbox.call(name, arguments)
        message = str(raised.value)
        assert text in message and "\n" not in message and "Traceback" not in message, (name, message)
        assert llama.interventions == [] and llama.edits == []
        assert torch.equal(clean_logits(llama), before), name
    assert [c.error is not None for c in toolbox.log] == [True] * len(cases)


def test_a_call_over_its_time_stops_between_chunks_and_leaves_the_model_clean(llama):
    from mechnb.agent.tools import Toolbox

    before = clean_logits(llama)
    toolbox = Toolbox(llama, limits={"seconds": 0})
    with pytest.raises(AgentError, match=r"patch: the patch tool's call ran past its 0 s: ask for fewer sites"):
        toolbox.call("patch", {"clean": CLEAN, "corrupt": CORRUPT, "sites": "head.*.*", "answer": " Mary"})
    assert llama.interventions == [] and torch.equal(clean_logits(llama), before)


def test_interventions_end_with_the_call_unless_persistent(llama):
    from mechnb.agent.tools import Toolbox

    toolbox = Toolbox(llama)
    measured = toolbox.call("ablate", {"sites": "mlp_out.1", "measure": PROMPT, "k": 3})
    with llama.ablated("mlp_out.1"):
        expected = llama.top(PROMPT, k=3)
    assert [r["prob"] for r in measured["after"]] == expected.prob.tolist()
    assert [r["prob"] for r in measured["before"]] == llama.top(PROMPT, k=3).prob.tolist()
    assert llama.interventions == [] and measured["persistent"] == []
    kept = toolbox.call("ablate", {"sites": "mlp_out.1", "measure": PROMPT, "k": 3, "persistent": True})
    assert len(llama.interventions) == 1 and len(kept["persistent"]) == 1
    assert toolbox.call("top", {"prompt": PROMPT, "k": 3})["table"] == kept["after"]
    mine = llama.ablate("head.0.1")  # the notebook's own intervention: clear leaves it
    assert toolbox.call("clear", {}) == {"removed": 1} and llama.interventions == mine
    llama.remove(mine)


def test_the_http_server_answers_a_real_client_with_the_apis_numbers(llama):
    from mechnb.agent.server import HTTPServer
    from mechnb.agent.tools import Toolbox

    server = HTTPServer(Toolbox(llama))
    arguments = {"clean": CLEAN, "corrupt": CORRUPT, "sites": "head.*.*", "answer": " Mary", "wrong": " John",
                 "figure": True}

    async def session():
        async with client_for(server) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            patched = await client.call_tool("patch", arguments)
            wrong = await client.call_tool("patch", {**arguments, "metric": "accuracy"})
            figures = (await client.list_resources()).resources
            png = (await client.read_resource(figures[0].uri)).contents[0]
            return names, patched, wrong, figures, png

    try:
        names, patched, wrong, figures, png = run(session())
        api = llama.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", progress=False)
        assert names[:3] == ["top", "cache_stats", "patch"] and "exec" not in names
        assert not patched.is_error
        assert patched.structured_content["values"] == api.values.float().tolist()
        assert json.loads(patched.content[0].text)["values"] == api.values.float().tolist()
        assert patched.structured_content["meta"]["clean_metric"] == api.meta["clean_metric"]
        assert wrong.is_error and "patch: metric: 'accuracy' is not one of" in wrong.content[0].text
        assert [f.uri for f in figures] == [patched.structured_content["figure"]]
        import base64

        assert base64.b64decode(png.blob)[:8] == b"\x89PNG\r\n\x1a\n" and png.mime_type == "image/png"
        assert [c.tool for c in server.toolbox.log] == ["patch", "patch"]
    finally:
        server.stop()


def test_the_http_server_wants_its_token_and_127_0_0_1(llama):
    from mechnb.agent.server import HTTPServer, _Guard
    from mechnb.agent.tools import Toolbox

    server = HTTPServer(Toolbox(llama))
    try:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            request = urllib.request.Request(server.url, data=body, headers={"Content-Type": "application/json",
                                                                             **headers})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401 and b"missing or wrong token" in refused.value.read()

        async def without_token():
            async with client_for(server, token=None) as client:
                await client.list_tools()

        with pytest.raises(BaseException):
            run(without_token())
        assert server.toolbox.log == []
        # Bound to 127.0.0.1: the machine's other addresses do not answer on the port.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            outside = probe.getsockname()[0]
        if not outside.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((outside, server.port), timeout=5).close()
    finally:
        server.stop()
    with pytest.raises(AgentError, match="binds to 127.0.0.1 or ::1 only"):
        HTTPServer(Toolbox(llama), host="0.0.0.0")

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("a request from outside reached the server")

    scope = {"type": "http", "client": ("10.1.2.3", 5555), "headers": [(b"authorization", b"Bearer t")]}
    run(_Guard(app, "t")(scope, None, send))
    assert sent[0]["status"] == 403 and b"127.0.0.1 only" in sent[1]["body"]


@pytest.mark.slow
def test_the_stdio_server_of_python_m_mechnb_mcp_answers_a_real_client(saved):
    import mechnb
    import mechnb.agent  # before the SDK: see mechnb.agent.server.prepare_anyio
    from mcp import Client, StdioServerParameters

    parameters = StdioServerParameters(command=sys.executable, args=["-m", "mechnb.mcp", "--model", str(saved)])

    async def session():
        async with Client(parameters) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            top = await client.call_tool("top", {"prompt": PROMPT, "k": 5})
            code = await client.call_tool("exec", {"code": "model.n_layers"})
            return names, top, code

    names, top, code = run(session())
    model = mechnb.load(saved)
    assert "patch" in names and "exec" not in names
    assert [r["prob"] for r in top.structured_content["table"]] == model.top(PROMPT, k=5).prob.tolist()
    assert code.is_error and "exec is off" in code.content[0].text


def test_exec_runs_only_when_allowed(llama):
    from mechnb.agent.tools import Toolbox

    assert Toolbox(llama, allow_exec=True).call("exec", {"code": "x = model.n_layers\nx * 2"}) == {"value": 6}
    assert "exec" not in Toolbox(llama).tools()


def test_mechnb_serve_starts_a_server_whose_calls_the_notebook_logs(shell, llama):
    from mechnb.model import Model

    shell.user_ns["m"] = llama
    assert shell.run_cell("%mechnb use m").success
    assert shell.run_cell("%mechnb serve").success
    session = shell.magics_manager.registry["MechnbMagics"].session
    server = session.server
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.toolbox.model is llama
        assert server.config()["mcpServers"]["mechnb"]["headers"]["Authorization"] == f"Bearer {server.token}"

        async def call():
            async with client_for(server) as client:
                return await client.call_tool("top", {"prompt": "<b>bold</b>", "k": 2})

        assert not run(call()).is_error
        log = server.toolbox.on_call.__self__
        assert [c.tool for c in log.calls] == ["top"]
        assert "<b>top</b>" in log.html() and "&lt;b&gt;bold&lt;/b&gt;" in log.html() and "<b>bold" not in log.html()
        assert not shell.run_cell("%mechnb serve").success  # one at a time
    finally:
        assert shell.run_cell("%mechnb serve --stop").success
    assert session.server is None and not server._thread.is_alive()
    assert isinstance(llama, Model)


def test_features_and_graph_tools_read_the_saes_and_transcoders_given_or_attached(llama):
    from mechnb.agent.tools import Toolbox
    from mechnb.sae import SAE
    from test_graphs import random_set

    torch.manual_seed(0)
    sae = SAE(llama.d_model, 32, kind="relu", site="resid_post.1")
    sae.labels = {f: f"feature {f}" for f in range(32)}
    got = Toolbox(llama, saes=[sae]).call("features", {"prompt": PROMPT, "k": 2})
    api = llama.features(PROMPT, sae, k=2).df
    assert [r["activation"] for r in got["table"]] == api.activation.tolist() and got["site"] == "resid_post.1"
    assert [r["label"] for r in got["table"]] == [f"feature {f}" for f in api.feature]
    with _attached(llama, sae):
        assert "features" in Toolbox(llama).tools()  # attached: offered without being given
    with pytest.raises(AgentError, match=r"features: site must be one of the SAEs' sites \(resid_post.1\)"):
        Toolbox(llama, saes=[sae]).call("features", {"prompt": PROMPT, "site": "resid_post.2"})

    transcoders = random_set(llama)
    graph = Toolbox(llama, transcoders=transcoders).call("graph", {"prompt": PROMPT, "top": 5})
    expected = llama.graph(PROMPT, transcoders)
    assert [r["influence"] for r in graph["top"]] == expected.top(5).influence.tolist()
    assert graph["scores"] == pytest.approx(expected.scores)
    assert llama.interventions == []


class _attached:
    def __init__(self, model, sae):
        self.model, self.sae = model, sae

    def __enter__(self):
        self.model.attach(self.sae)

    def __exit__(self, *exc):
        self.model.detach(self.sae)
