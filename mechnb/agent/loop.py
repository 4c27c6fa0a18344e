"""An investigation in the cell: a language model runs experiments on the model and reports.

    >>> report = mechnb.agent.investigate("Which heads move the indirect object's name to the answer?",
    ...                                   model, llm="http://localhost:8000/v1", budget=dict(steps=30, minutes=10))
    >>> report.claims            # each claim with the tool calls it cites
    >>> report.verify()          # reruns the cited calls: reproduced or not, claim by claim
    >>> report.save("ioi.json"); Report.load("ioi.json", model)

The language model is any OpenAI-compatible chat endpoint with tool calling (`llm` a URL; its
`/chat/completions` gets the tools in the `tools` field), or a Python function
`llm(messages, tools) -> message` that answers like one (a dict with `content` and
`tool_calls`). It sees the same tools as the MCP server (`mechnb.agent.tools`), plus `report`,
with which it ends: a summary and claims, each citing the numbers of the calls that support it.

How a run goes:
- every reply's text (the model's reasoning as it sent it), every call and its result stream
  into the cell as they happen;
- a malformed call (unknown tool, arguments that are not JSON or do not fit the schema) or a
  failing one goes back to the language model as the tool's error, never a crash; so does a
  report citing a call that never ran or failed;
- the budget counts steps (replies), tokens (as the endpoint reports them, else four characters
  a token) and minutes; when one runs out, the run stops with an unfinished report;
- an endpoint that does not answer, times out or answers with something other than a chat
  completion stops the run with one line (`AgentError`), the transcript so far on the error.
"""

from __future__ import annotations

import html
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import AgentError
from .tools import Call, Toolbox

SYSTEM = """You are a mechanistic interpretability researcher with a live language model to experiment on: \
{model}. Each tool runs one experiment and returns JSON. Sites are written like resid_post.12, \
head.9.6, mlp_out.*, head.*.*@-1 (layers and heads count from 0). Work step by step: state what you \
expect, run the experiment, read the numbers. When you can answer, call `report` once with a short \
summary and your claims, each citing the numbers of the calls (the `call` field of each result) whose \
results support it. Cite only calls that succeeded."""

REPORT_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "description": "the answer to the question, in a few sentences."},
        "claims": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {
                "text": {"type": "string", "description": "one finding."},
                "calls": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                          "description": "the numbers of the calls whose results support it."}},
            "required": ["text", "calls"], "additionalProperties": False}}},
    "required": ["summary", "claims"], "additionalProperties": False}

DEFAULT_BUDGET = {"steps": 30, "tokens": 200_000, "minutes": 10.0}
RESULT_CHARS = 12_000  # a call's result as the language model reads it, at most (about 3,000 tokens)


@dataclass
class Claim:
    text: str
    calls: list[int]
    reproduced: bool | None = None


@dataclass
class Report:
    """What an investigation found: `summary`, `claims` (each citing calls), `calls` (every call
    that ran, by number), `transcript` (every event), `finished` (False when the budget ran out)."""

    question: str
    summary: str
    claims: list[Claim]
    calls: dict[int, Call]
    transcript: list[dict]
    finished: bool
    model: object = field(default=None, repr=False, compare=False)

    def verify(self, model=None, rtol: float = 1e-4):
        """Rerun every call the claims cite, with the same arguments, on `model` (default the
        investigated one); a claim is reproduced when each of its calls gives the same result
        (numbers within `rtol`). Returns a DataFrame: claim, calls, reproduced, and what differed."""
        import pandas as pd

        model = model if model is not None else self.model
        if model is None:
            raise AgentError("verify needs the model: report.verify(model)")
        toolbox = Toolbox(model, allow_exec=any(c.tool == "exec" for c in self.calls.values()))
        rows, again = [], {}
        for claim in self.claims:
            missing = [n for n in claim.calls if n not in self.calls or self.calls[n].error is not None]
            if missing:
                raise AgentError(f"claim {claim.text!r} cites call(s) {missing} that never ran or failed")
            differences = []
            for number in claim.calls:
                original = self.calls[number]
                if number not in again:
                    try:
                        again[number] = toolbox.call(original.tool, dict(original.arguments))
                    except AgentError as error:
                        again[number] = {"error": str(error)}
                difference = _difference(original.result, again[number], rtol)
                if difference:
                    differences.append(f"call {number} ({original.tool}): {difference}")
            claim.reproduced = not differences
            rows.append({"claim": claim.text, "calls": claim.calls, "reproduced": claim.reproduced,
                         "differences": "; ".join(differences)})
        return pd.DataFrame(rows, columns=["claim", "calls", "reproduced", "differences"])

    def to_json(self) -> dict:
        return {"question": self.question, "summary": self.summary, "finished": self.finished,
                "claims": [asdict(c) for c in self.claims],
                "calls": [asdict(c) for c in self.calls.values()], "transcript": self.transcript}

    def save(self, path) -> Path:
        """The report and its transcript as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path, model=None) -> "Report":
        """A report `save` wrote (with `model`, `verify()` can rerun its calls)."""
        try:
            data = json.loads(Path(path).read_text())
            calls = {c["id"]: Call(**c) for c in data["calls"]}
            claims = [Claim(**c) for c in data["claims"]]
            return cls(data["question"], data["summary"], claims, calls, data["transcript"], data["finished"], model)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise AgentError(f"{path} is not a report saved by Report.save: {error}") from None

    def html(self) -> str:
        state = "" if self.finished else " <i>(unfinished: the budget ran out)</i>"
        items = "".join(f"<li>{html.escape(c.text)} <small>(calls {', '.join(map(str, c.calls))}"
                        f"{'' if c.reproduced is None else ', reproduced' if c.reproduced else ', NOT reproduced'})"
                        f"</small></li>" for c in self.claims)
        return (f"<div class='mechnb-report'><b>{html.escape(self.question)}</b>{state}"
                f"<p>{html.escape(self.summary)}</p><ol>{items}</ol></div>")

    def _repr_html_(self) -> str:
        return self.html()

    def __repr__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        lines = [f"<mechnb.agent.Report {state}: {self.question!r}: {len(self.claims)} claims, {len(self.calls)} calls>",
                 f"  {self.summary}"]
        for claim in self.claims:
            mark = "" if claim.reproduced is None else " [reproduced]" if claim.reproduced else " [NOT reproduced]"
            lines.append(f"  - {claim.text} (calls {', '.join(map(str, claim.calls))}){mark}")
        return "\n".join(lines)


TIMINGS = ("seconds",)  # how long a call took is not its result


def _difference(first, second, rtol: float) -> str:
    """'' when `first` and `second` (JSON) agree, numbers within `rtol`, timings aside; else
    where they part."""
    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            if set(a) != set(b):
                return f"{where or 'result'} has keys {sorted(b)} against {sorted(a)}"
            return next((d for k in a if k not in TIMINGS
                         and (d := walk(a[k], b[k], f"{where}.{k}" if where else k))), "")
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return f"{where} has {len(b)} items against {len(a)}"
            return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := walk(x, y, f"{where}[{i}]"))), "")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            if math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3):
                return ""
            return f"{where} is {b!r} against {a!r}"
        return "" if a == b else f"{where} is {b!r} against {a!r}"

    return walk(first, second, "")


# -- the language model ----------------------------------------------------------------------

def _openai_tools(toolbox: Toolbox) -> list[dict]:
    tools = [{"type": "function", "function": {"name": s["name"], "description": s["description"],
                                               "parameters": s["input_schema"]}} for s in toolbox.schemas()]
    tools.append({"type": "function", "function": {
        "name": "report", "description": "End the investigation: the answer and the claims, each citing calls.",
        "parameters": REPORT_SCHEMA}})
    return tools


def _endpoint(url: str, model_name: str, timeout: float):
    """`ask(messages, tools) -> (message, tokens)` for an OpenAI-compatible chat endpoint."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"

    def ask(messages, tools):
        body = json.dumps({"model": model_name, "messages": messages, "tools": tools, "tool_choice": "auto",
                           "temperature": 0}).encode()
        request = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise AgentError(f"the language model at {endpoint} answered HTTP {error.code}: "
                             f"{error.read()[:200].decode(errors='replace')!r}") from None
        except TimeoutError:
            raise AgentError(f"the language model at {endpoint} did not answer within {timeout:.0f} s") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise AgentError(f"the language model at {endpoint} did not answer within {timeout:.0f} s") from None
            raise AgentError(f"the language model at {endpoint} could not be reached ({reason})") from None
        try:
            reply = json.loads(raw)
            message = reply["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise AgentError(f"the language model at {endpoint} did not answer like the OpenAI chat API "
                             f"({type(error).__name__}: {error}): {raw[:120]!r}") from None
        tokens = (reply.get("usage") or {}).get("total_tokens")
        return message, tokens

    return ask


def _function(llm):
    def ask(messages, tools):
        message = llm(messages, tools)
        if not isinstance(message, dict):
            raise AgentError(f"the llm function must return a message dict (content, tool_calls), "
                             f"got {type(message).__name__}")
        return message, None

    return ask


# -- the loop ----------------------------------------------------------------------------------

class _Stream:
    """The transcript as it grows, shown in the cell (a display updated in place) when `show`."""

    def __init__(self, show: bool):
        self.events, self.handle = [], None
        if show:
            try:
                from IPython import get_ipython
                from IPython.display import HTML, display

                if get_ipython() is not None:
                    self.handle = display(HTML(""), display_id=True)
            except ImportError:
                pass

    def add(self, event: dict) -> None:
        self.events.append(event)
        if self.handle is not None:
            from IPython.display import HTML

            self.handle.update(HTML(transcript_html(self.events)))


def transcript_html(events: list[dict]) -> str:
    """The transcript as HTML: the model's words, each call and its result (or error)."""
    parts = []
    for event in events:
        kind = event["kind"]
        if kind == "llm" and event.get("content"):
            parts.append(f"<p style='margin:4px 0'><i>{html.escape(event['content'])}</i></p>")
        elif kind == "call":
            arguments = html.escape(json.dumps(event["arguments"])[:300])
            if event.get("error"):
                outcome = f"<span style='color:#b00'>{html.escape(event['error'])}</span>"
            else:
                outcome = html.escape(event.get("summary") or json.dumps(event["result"])[:300])
            figure = (f"<br/><img style='max-width:480px' src='data:image/png;base64,{event['png']}'/>"
                      if event.get("png") else "")
            parts.append(f"<div style='margin:4px 0'><b>[{event['call']}] {html.escape(event['tool'])}</b> "
                         f"<code>{arguments}</code><br/>{outcome}{figure}</div>")
        elif kind == "error":
            parts.append(f"<div style='color:#b00'>{html.escape(event['message'])}</div>")
        elif kind == "stop":
            parts.append(f"<div><b>stopped:</b> {html.escape(event['reason'])}</div>")
    return "<div class='mechnb-transcript'>" + "".join(parts) + "</div>"


def investigate(question: str, model, llm, budget: dict | None = None, allow_exec: bool = False,
                llm_model: str = "default", timeout: float = 60.0, show: bool = True) -> Report:
    """Let a language model investigate `question` on `model` with the toolbox's experiments.

    Args:
        question: what to find out, in words.
        model: the mechnb Model experimented on.
        llm: an OpenAI-compatible endpoint's base URL (`http://localhost:8000/v1`), or a
            function `llm(messages, tools) -> message` (an assistant message as a dict).
        budget: `steps` (replies of the language model), `tokens`, `minutes`; defaults
            30, 200,000 and 10.
        allow_exec: offer the `exec` tool (Python in this process); off by default.
        llm_model: the `model` field sent to the endpoint.
        timeout: seconds to wait for one reply of the endpoint.
        show: stream the transcript into the cell.

    Returns:
        A `Report`. Example: `investigate("Which heads write the answer?", model, llm=url).verify()`.
    """
    budget = {**DEFAULT_BUDGET, **(budget or {})}
    unknown = set(budget) - set(DEFAULT_BUDGET)
    if unknown:
        raise AgentError(f"budget takes steps, tokens and minutes, got {sorted(unknown)}")
    if isinstance(llm, str) and llm.startswith(("http://", "https://")):
        ask = _endpoint(llm, llm_model, timeout)
    elif callable(llm):
        ask = _function(llm)
    else:
        raise AgentError(f"llm must be an http(s) URL of an OpenAI-compatible endpoint or a function, got {llm!r}")
    stream = _Stream(show)
    figures = {}

    def on_call(call: Call) -> None:
        event = {"kind": "call", "call": call.id, "tool": call.tool, "arguments": call.arguments,
                 "result": call.result, "error": call.error, "seconds": call.seconds,
                 "summary": (call.result or {}).get("summary") if isinstance(call.result, dict) else None}
        if call.figure:
            import base64

            event["png"] = base64.b64encode(toolbox.figures[call.figure]).decode()
            figures[call.id] = call.figure
        stream.add(event)

    toolbox = Toolbox(model, allow_exec=allow_exec, on_call=on_call)
    tools = _openai_tools(toolbox)
    messages = [{"role": "system", "content": SYSTEM.format(model=f"{model.name}, {model.n_layers} layers, "
                                                                  f"{model.n_heads} heads")},
                {"role": "user", "content": question}]
    started, tokens, steps = time.monotonic(), 0, 0
    report = None
    stop_reason = ""
    try:
        while report is None:
            if steps >= budget["steps"]:
                stop_reason = f"the budget of {budget['steps']} steps ran out"
                break
            if tokens >= budget["tokens"]:
                stop_reason = f"the budget of {budget['tokens']} tokens ran out ({tokens} used)"
                break
            if time.monotonic() - started >= 60 * budget["minutes"]:
                stop_reason = f"the budget of {budget['minutes']:g} minutes ran out"
                break
            message, used = ask(messages, tools)
            steps += 1
            tokens += used if used is not None else (len(json.dumps(messages[-1])) + len(json.dumps(message))) // 4
            content, tool_calls = message.get("content") or "", message.get("tool_calls") or []
            stream.add({"kind": "llm", "content": content, "tool_calls": tool_calls})
            messages.append({"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls
                                                                          else {})})
            if not tool_calls:
                messages.append({"role": "user", "content": "Continue with a tool call, or end with `report`."})
                continue
            for number, tool_call in enumerate(tool_calls):
                answer, report = _handle(tool_call, toolbox, question, stream)
                messages.append({"role": "tool", "tool_call_id": str(tool_call.get("id", number)),
                                 "content": answer})
                if report is not None:
                    break
    except AgentError as error:
        error.transcript = stream.events
        raise
    if report is None:
        stream.add({"kind": "stop", "reason": stop_reason})
        report = Report(question, f"unfinished: {stop_reason}", [], {}, [], False)
    report.calls = {c.id: c for c in toolbox.log}
    report.transcript, report.model = stream.events, model
    return report


def _handle(tool_call: dict, toolbox: Toolbox, question: str, stream: _Stream):
    """Run one tool call of the language model: `(the tool message's text, a Report or None)`."""
    function = tool_call.get("function") or {}
    name, text = function.get("name"), function.get("arguments") or "{}"
    try:
        arguments = json.loads(text) if isinstance(text, str) else dict(text)
        if not isinstance(arguments, dict):
            raise ValueError("not an object")
    except (ValueError, TypeError) as error:
        message = f"error: the arguments of {name} are not a JSON object ({error}): {str(text)[:200]}"
        stream.add({"kind": "error", "message": message})
        return message, None
    if name == "report":
        return _report(arguments, toolbox, question, stream)
    try:
        result = toolbox.call(name, arguments)
    except AgentError as error:
        return f"error: {error}", None
    return _fitted({"call": toolbox.log[-1].id, **result}), None


def _fitted(result: dict) -> str:
    """`result` as JSON of at most `RESULT_CHARS` characters, still JSON: the full `values`
    give way first (the table keeps the largest rows), then the table's last rows."""
    text = json.dumps(result)
    if len(text) > RESULT_CHARS and "values" in result:
        count = len(json.dumps(result["values"]).split(","))
        result = {**result, "values": f"{count} numbers left out to fit: the table has the largest; "
                                      "ask for fewer sites to get them all"}
        text = json.dumps(result)
    while len(text) > RESULT_CHARS and isinstance(result.get("table"), list) and len(result["table"]) > 1:
        result = {**result, "table": result["table"][: len(result["table"]) // 2]}
        text = json.dumps(result)
    return text if len(text) <= RESULT_CHARS else json.dumps(
        {"call": result.get("call"), "error": f"the result is longer than {RESULT_CHARS} characters: ask for less"})


def _report(arguments: dict, toolbox: Toolbox, question: str, stream: _Stream):
    import jsonschema

    try:
        jsonschema.validate(arguments, REPORT_SCHEMA)
    except jsonschema.ValidationError as error:
        message = f"error: report: {error.message}"
        stream.add({"kind": "error", "message": message})
        return message, None
    ran = {c.id for c in toolbox.log if c.error is None}
    for claim in arguments["claims"]:
        bad = [n for n in claim["calls"] if n not in ran]
        if bad:
            message = (f"error: report: the claim {claim['text'][:80]!r} cites call(s) {bad} that never ran or "
                       f"failed; the calls that ran are {sorted(ran) or 'none'}")
            stream.add({"kind": "error", "message": message})
            return message, None
    claims = [Claim(c["text"], list(c["calls"])) for c in arguments["claims"]]
    stream.add({"kind": "report", "summary": arguments["summary"], "claims": [asdict(c) for c in claims]})
    return "report received", Report(question, arguments["summary"], claims, {}, [], True)
