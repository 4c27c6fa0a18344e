"""The investigation loop (`mechnb.agent.investigate`) against a local OpenAI-compatible server
this test starts and scripts: tool calls, errors fed back, the budget, the report and its
verification, and endpoints that fail."""

import http.server
import json
import socket
import threading
import time

import pytest
import torch

from conftest import PROMPT, clean_logits, json_server
from mechnb import AgentError

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def llama(tiny_factory):
    return tiny_factory("llama")


def tool_call(name, arguments, number=0):
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{number}", "type": "function", "function": {"name": name, "arguments": text}}


def scripted(replies):
    """`reply(body)` for json_server: the next scripted assistant message each request, and
    every request body kept in `reply.requests`."""
    requests = []

    def reply(body):
        requests.append(body)
        message = replies[min(len(requests), len(replies)) - 1]
        return 200, {"choices": [{"message": {"role": "assistant", **message}}],
                     "usage": {"total_tokens": 100}}

    reply.requests = requests
    return reply


def tool_messages(request):
    return [m["content"] for m in request["messages"] if m["role"] == "tool"]


def test_a_scripted_investigation_runs_feeds_errors_back_and_verifies(llama, tmp_path):
    from mechnb.agent import Report, investigate

    patch = {"clean": CLEAN, "corrupt": CORRUPT, "sites": "head.*.*", "answer": " Mary", "wrong": " John"}
    replies = [
        {"content": "Patching with a metric that does not exist.", "tool_calls": [tool_call("patch", {**patch, "metric": "accuracy"})]},
        {"content": "", "tool_calls": [tool_call("top", "{not json", 1)]},
        {"content": "Let me run code.", "tool_calls": [tool_call("exec", {"code": "model.hf.zero_()"}, 2)]},
        {"content": "Now properly.", "tool_calls": [tool_call("patch", patch, 3)]},
        {"content": "", "tool_calls": [tool_call("report", {"summary": "s", "claims": [{"text": "a", "calls": [99]}]}, 4)]},
        {"content": "Done.", "tool_calls": [tool_call("report", {
            "summary": "Head patching moves the logit difference.",
            "claims": [{"text": "patching heads recovers the answer", "calls": [3]}]}, 5)]},
    ]
    reply = scripted(replies)
    before = clean_logits(llama)
    with json_server(reply) as url:
        report = investigate("Which heads matter?", llama, llm=url + "/v1", show=False)
    requests = reply.requests
    assert len(requests) == 6
    names = [t["function"]["name"] for t in requests[0]["tools"]]
    assert names[:3] == ["top", "cache_stats", "patch"] and names[-1] == "report" and "exec" not in names
    assert requests[0]["messages"][1] == {"role": "user", "content": "Which heads matter?"}
    fed_back = [tool_messages(r)[-1] if tool_messages(r) else None for r in requests]
    assert fed_back[1].startswith("error: patch: metric: 'accuracy' is not one of")
    assert fed_back[2].startswith("error: the arguments of top are not a JSON object")
    assert "exec is off" in fed_back[3]
    patched = json.loads(fed_back[4])
    api = llama.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", progress=False)
    assert patched["call"] == 3 and patched["values"] == api.values.float().tolist()
    assert "cites call(s) [99] that never ran or failed; the calls that ran are [3]" in fed_back[5]
    assert report.finished and report.summary == "Head patching moves the logit difference."
    assert [c.calls for c in report.claims] == [[3]] and [c.tool for c in report.calls.values()] == ["patch", "exec", "patch"]
    assert torch.equal(clean_logits(llama), before) and llama.interventions == []
    table = report.verify()
    assert table.reproduced.tolist() == [True] and report.claims[0].reproduced
    kinds = [e["kind"] for e in report.transcript]
    assert kinds.count("llm") == 6 and kinds.count("call") == 3 and kinds[-1] == "report"

    again = Report.load(report.save(tmp_path / "report.json"), llama)
    assert again.to_json() == report.to_json()
    assert again.verify().reproduced.tolist() == [True]
    # A result that the model no longer gives is not reproduced, and says where it parts.
    data = json.loads((tmp_path / "report.json").read_text())
    data["calls"][-1]["result"]["values"][0][0] += 1.0
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    table = Report.load(tmp_path / "tampered.json", llama).verify()
    assert table.reproduced.tolist() == [False] and "call 3 (patch): values[0][0] is" in table.differences[0]
    # A claim that cites a call that never ran is one line.
    data["claims"][0]["calls"] = [7]
    (tmp_path / "cites.json").write_text(json.dumps(data))
    with pytest.raises(AgentError, match=r"cites call\(s\) \[7\] that never ran or failed"):
        Report.load(tmp_path / "cites.json", llama).verify()


def test_the_budget_stops_a_run_that_does_not_end(llama):
    from mechnb.agent import investigate

    reply = scripted([{"content": "again", "tool_calls": [tool_call("top", {"prompt": PROMPT, "k": 2})]}])
    with json_server(reply) as url:
        report = investigate("Loop.", llama, llm=url, budget={"steps": 3}, show=False)
    assert not report.finished and report.claims == [] and len(report.calls) == 3
    assert report.transcript[-1] == {"kind": "stop", "reason": "the budget of 3 steps ran out"}
    with json_server(scripted([{"content": "again", "tool_calls": [tool_call("top", {"prompt": PROMPT})]}])) as url:
        report = investigate("Loop.", llama, llm=url, budget={"tokens": 250}, show=False)
    assert len(report.calls) == 3 and "tokens ran out (300 used)" in report.transcript[-1]["reason"]
    report = investigate("Loop.", llama, llm=lambda messages, tools: {"content": "x"}, budget={"minutes": 0},
                         show=False)
    assert report.transcript == [{"kind": "stop", "reason": "the budget of 0 minutes ran out"}]
    with pytest.raises(AgentError, match="budget takes steps, tokens and minutes"):
        investigate("x", llama, llm=url, budget={"hours": 1})


def test_a_python_function_can_be_the_language_model(llama):
    from mechnb.agent import investigate

    seen = []

    def llm(messages, tools):
        seen.append([m["role"] for m in messages])
        if len(seen) == 1:
            return {"content": "", "tool_calls": [tool_call("top", {"prompt": PROMPT, "k": 1})]}
        top = json.loads(messages[-1]["content"])["table"][0]["token"]
        return {"content": "", "tool_calls": [tool_call("report", {
            "summary": f"the top token is {top!r}", "claims": [{"text": f"top is {top!r}", "calls": [1]}]})]}

    report = investigate("What comes next?", llama, llm=llm, show=False)
    assert report.summary == f"the top token is {llama.top(PROMPT, k=1).token[0]!r}"
    assert seen == [["system", "user"], ["system", "user", "assistant", "tool"]]


def test_endpoints_that_fail_are_one_line_and_leave_the_model_clean(llama):
    from mechnb.agent import investigate

    before = clean_logits(llama)
    # A bound socket that never listens refuses connections, and holds its port while the test
    # runs (a closed one's port could go to one of the servers below).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]

    class Raw(http.server.BaseHTTPRequestHandler):
        body, delay = b"", 0.0

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(self.delay)
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.body)))
                self.end_headers()
                self.wfile.write(self.body)
            except BrokenPipeError:  # the client gave up waiting: what the timeout case tests
                pass

        def log_message(self, *args):
            pass

    def raw_server(body, delay=0.0):
        handler = type("Handler", (Raw,), {"body": body, "delay": delay})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    cases = [(f"http://127.0.0.1:{port}/v1", {}, "could not be reached"),
             (raw_server(b"<html>not json</html>"), {}, "did not answer like the OpenAI chat API"),
             (raw_server(b'{"choices": []}'), {}, "did not answer like the OpenAI chat API"),
             (raw_server(b"{}", delay=3.0), {"timeout": 1.0}, "did not answer within 1 s")]
    for endpoint, options, words in cases:
        url = endpoint if isinstance(endpoint, str) else f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
        with pytest.raises(AgentError) as raised:
            investigate("x", llama, llm=url, show=False, **options)
        assert words in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
        assert isinstance(raised.value.transcript, list)
        if not isinstance(endpoint, str):
            endpoint.shutdown()
            endpoint.server_close()
    silent.close()
    with pytest.raises(AgentError, match="llm must be an http"):
        investigate("x", llama, llm="localhost:8000")
    assert torch.equal(clean_logits(llama), before) and llama.interventions == []


@pytest.mark.slow
def test_an_ioi_investigation_on_the_embedded_model_cites_the_heads_the_api_finds(real):
    """Scripted to follow a known path: DLA, head patching, path patching into the last
    position's residual stream; its claims name the heads those calls rank first."""
    from mechnb.agent import investigate

    def dla_heads(result, n=3):  # DLA's components h0..h8 (the mlp left out), largest first
        rows = sorted((r for r in result["table"] if r["component"].startswith("h")), key=lambda r: -r["value"])
        return [f"{r['layer']}.{r['component'][1:]}" for r in rows[:n]]

    def patched_heads(result, n=5):  # ranked by effect
        return [f"{r['layer']}.{r['head']}" for r in result["table"][:n]]

    found = {}

    def llm(messages, tools):
        step = sum(m["role"] == "assistant" for m in messages)
        if step == 0:
            return {"content": "Which components write Mary over John?", "tool_calls": [
                tool_call("dla", {"prompt": CLEAN, "answer": " Mary", "wrong": " John", "top": 10})]}
        last = json.loads(messages[-1]["content"])
        if step == 1:
            found["dla"] = dla_heads(last)
            return {"content": "", "tool_calls": [tool_call("patch", {
                "clean": CLEAN, "corrupt": CORRUPT, "sites": "head.18:30.*", "answer": " Mary", "wrong": " John",
                "top": 10}, 1)]}
        if step == 2:
            found["patch"] = patched_heads(last)
            return {"content": "", "tool_calls": [tool_call("path_patch", {
                "clean": CLEAN, "corrupt": CORRUPT, "senders": "head.18:30.*", "receivers": "resid_post.29",
                "answer": " Mary", "wrong": " John", "top": 10}, 2)]}
        found["path"] = patched_heads(last)
        heads = [h for h in found["dla"] if h in found["patch"] + found["path"]] or found["dla"][:1]
        return {"content": "", "tool_calls": [tool_call("report", {
            "summary": f"Heads {', '.join(heads)} move the indirect object's name to the answer.",
            "claims": [{"text": f"head {h} writes ' Mary' over ' John' directly", "calls": [1]} for h in heads]
                      + [{"text": "patching these heads moves the logit difference", "calls": [2, 3]}]}, 3)]}

    report = investigate("Which heads move the indirect object's name to the answer?", real, llm=llm, show=False)
    dla = real.dla(CLEAN, " Mary", " John").values[:, :real.n_heads]  # layer head (the MLP column left out)
    best = int(dla.argmax())
    assert found["dla"][0] == f"{best // real.n_heads}.{best % real.n_heads}" == "23.3"
    patched = real.patch(CLEAN, CORRUPT, "head.18:30.*", answer=" Mary", wrong=" John", progress=False)
    effect = (patched.values - patched.meta["corrupt_metric"]).abs()
    assert found["patch"][0] == f"{18 + int(effect.argmax()) // real.n_heads}.{int(effect.argmax()) % real.n_heads}"
    assert "23.3" in found["patch"]
    assert any("23.3" in claim.text for claim in report.claims) and report.finished
    assert report.verify().reproduced.all()
