"""The experiments a language model may run on a live model: one typed tool per API call.

An MCP client (Claude Desktop, Claude Code, any agent) or `mechnb.agent.investigate` sees each
tool as a name, a description and a JSON schema, and gets compact JSON back:

    >>> tools = Toolbox(model)
    >>> tools.schemas()[0]["name"], tools.schemas()[0]["input_schema"]["properties"]["k"]
    ('top', {'type': 'integer', 'default': 10, 'minimum': 1, 'maximum': 50, 'description': ...})
    >>> tools.call("patch", {"clean": clean, "corrupt": corrupt, "sites": "head.*.*",
    ...                      "answer": " Mary", "wrong": " John"})["values"]   # model.patch(...).values

Written once: a tool is one method of `mechnb.Model`, and its description, its parameters,
their defaults and their descriptions are read from that method's own signature and
docstring (the `Args:` entries). What JSON cannot read from a Python signature, the type of
an argument such as `sites` (a pattern or a list of them), is `TYPES`, one entry per argument
name for every tool; `ABOUT` describes the few arguments whose method documents them only in
prose. A tool adds only what the call itself needs (`persistent`, `top`, the measuring
prompt of `ablate`).

Every call is scoped and bounded:
- the interventions a call makes end with it, unless the client asks for `persistent` ones
  (`ablate`, `steer_generate`), which `clear` removes; after a failed call the model's
  interventions and weight edits are as before it;
- prompts, prompt lists, grids, tables and new tokens are capped (`LIMITS`), and a call runs
  at most `LIMITS["seconds"]`: sweeps stop between chunks when over (`mechnb.core.memory`);
- errors come back as one line naming the tool and what was wrong, never a traceback;
- `exec` (Python in the model's process) exists only when the toolbox is built with
  `allow_exec=True` (`--allow-exec`).

Values come back exactly as the API gives them (`values` is `Result.values.tolist()`, NaN as
null); figures are PNG bytes kept by the toolbox (`figure=True`), which the MCP server offers as
resources.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.errors import AgentError, MechnbError

LIMITS = {"prompt_tokens": 256, "prompts": 32, "sites": 2048, "table_rows": 50, "new_tokens": 64, "seconds": 120.0,
          "examples": 256, "exec_chars": 4000}

_STRING_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
_ANSWER = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                     {"type": "null"}]}
_METRICS = ["logit_diff", "prob", "logprob", "kl"]

# JSON types of arguments whose Python annotation does not say enough, by name, for every tool.
TYPES = {
    "prompt": {"type": "string", "minLength": 1},
    "prompts": _STRING_OR_LIST, "clean": _STRING_OR_LIST, "corrupt": _STRING_OR_LIST,
    "sites": _STRING_OR_LIST, "senders": _STRING_OR_LIST, "receivers": _STRING_OR_LIST,
    "site": {"type": "string", "minLength": 1},
    "positive": _STRING_OR_LIST, "negative": _STRING_OR_LIST,
    "answer": _ANSWER, "wrong": _ANSWER,
    "metric": {"type": "string", "enum": _METRICS},
    "circuit_metric": {"type": "string", "enum": [*_METRICS, "prob_diff"]},
    "per_position": {"type": ["boolean", "null"]},
    "method": {"type": "string"},
    "direction": {"type": "string", "enum": ["denoising", "noising"]},
    "freeze": {"type": "string", "enum": ["heads", "all", "none"]},
    "mode": {"type": "string", "enum": ["zero", "mean", "resample"]},
    "ref": {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"type": "null"}]},
    "positions": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]},
    "kind": {"anyOf": [{"type": "string", "enum": ["induction", "previous_token", "duplicate_token"]},
                       {"type": "array", "items": {"type": "string",
                                                   "enum": ["induction", "previous_token", "duplicate_token"]}}]},
    "level": {"type": "string", "enum": ["edge", "node"]},
    "variable": {"type": "string"},
}

# The ranges of numbers, by name: what a call may ask for.
BOUNDS = {"k": (1, 50), "steps": (1, 16), "n_samples": (1, 32), "seq_len": (4, 64), "seed": (0, 2**31 - 1),
          "max_new_tokens": (1, LIMITS["new_tokens"]), "scale": (-100.0, 100.0), "top": (1, LIMITS["table_rows"]),
          "n": (4, LIMITS["examples"])}

# Arguments the method documents only in its prose (or a tool adds), described once here.
ABOUT = {
    "prompt": "the prompt (text).",
    "k": "how many rows to return (the k largest).",
    "answer": "the answer token (a string; its first token is used).",
    "wrong": "a wrong answer token to subtract (logit difference), or null.",
    "kind": "one of induction, previous_token, duplicate_token, or a list of them.",
    "persistent": "keep the intervention after this call (until `clear`); default false: it ends with the call.",
    "top": "how many rows of the table to return, largest |value| first.",
    "figure": "also draw the result as a PNG figure (returned as an image and kept as a resource).",
    "measure": "the prompt to measure the model on, with and without the intervention.",
    "task": "a causal task of `mechnb.causal.tasks`: `pronouns` (variable gender) or `ioi` (position, token).",
    "n": "how many counterfactual examples to draw.",
    "senders": "the senders' pattern (`head.*.*`), each patched from the source run.",
    "receivers": "the receivers (`head.L.H`: queries, keys and values; `pattern.L.H`: queries and keys; "
                 "`resid_post.L`: the residual stream) that alone carry the senders' effect.",
    "freeze": "what is held at its target-run value while a sender is patched: `heads` (every other head), "
              "`all` (MLP outputs too) or `none`.",
    "scale": "the multiple of the steering vector added.",
    "max_new_tokens": "how many tokens to generate (greedy).",
    "site": "the site of the attached SAE to read, when several are attached.",
    "seed": "the seed of the random draws.",
    "code": "Python run in the model's process, with `model` bound; the value of its last line comes back.",
}


def _docstring_args(fn) -> dict[str, str]:
    """`{name: description}` from the `Args:` section of `fn`'s docstring (`a, b: text` names both),
    then from the method its prose points to ("Other arguments as in `patch`")."""
    doc = inspect.getdoc(fn) or ""
    pointer = re.search(r"arguments\s+as\s+in\s+`(\w+)`", doc)
    if pointer and "Args:" not in doc:
        from ..model import Model

        return _docstring_args(getattr(Model, pointer.group(1)))
    match = re.search(r"^Args:\n(.*?)(?:\n\S|\Z)", doc, re.S | re.M)
    if not match:
        return {}
    found, names = {}, []
    for line in match.group(1).splitlines():
        entry = re.match(r"^ {4}([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                found[name] = entry.group(2).strip()
        elif line.strip() and names:
            for name in names:
                found[name] += " " + line.strip()
    return found


def _summary(fn) -> str:
    """The docstring's first paragraph, on one line."""
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _annotation_type(annotation) -> dict | None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return {"int": {"type": "integer"}, "float": {"type": "number"}, "bool": {"type": "boolean"},
            "str": {"type": "string"}, "int | None": {"type": ["integer", "null"]}}.get(text)


@dataclass
class Tool:
    """One experiment: the `method` of `mechnb.Model` whose signature and docstring it carries,
    the arguments it exposes (`params`), what it adds (`extra`: name -> (schema, default)), and
    `run(model, arguments) -> dict` (JSON)."""

    name: str
    method: str
    params: tuple
    run: Callable
    extra: dict = field(default_factory=dict)
    returns: str = ""
    schema_names: dict = field(default_factory=dict)  # argument -> its TYPES entry when not its own name
    available: Callable | None = None  # toolbox -> None, or why the tool is not offered
    description: str = ""  # instead of the method's summary, for a tool that is not one method

    def schema(self, model_class) -> dict:
        """`{"name", "description", "input_schema"}` from the method's signature and docstring."""
        fn = getattr(model_class, self.method)
        signature = inspect.signature(fn)
        documented = _docstring_args(fn)
        properties, required = {}, []
        for name in self.params:
            parameter = signature.parameters[name]
            entry = dict(TYPES.get(self.schema_names.get(name, name)) or _annotation_type(parameter.annotation) or {})
            if not entry:
                raise AgentError(f"tool {self.name}: no JSON type for {self.method}'s argument {name!r} (add it to TYPES)")
            if parameter.default is inspect.Parameter.empty:
                required.append(name)
            elif _json_safe(parameter.default):
                entry["default"] = parameter.default
            self._bound(name, entry)
            entry["description"] = documented.get(name) or ABOUT.get(name, "")
            properties[name] = entry
        for name, (entry, default) in self.extra.items():
            entry = dict(entry)
            if default is inspect.Parameter.empty:
                required.append(name)
            else:
                entry["default"] = default
            self._bound(name, entry)
            entry["description"] = ABOUT.get(name, "")
            properties[name] = entry
        description = (self.description or _summary(fn)) + (f" Returns {self.returns}" if self.returns else "")
        return {"name": self.name, "description": description,
                "input_schema": {"type": "object", "properties": properties, "required": required,
                                 "additionalProperties": False}}

    @staticmethod
    def _bound(name: str, entry: dict) -> None:
        if name in BOUNDS and entry.get("type") in ("integer", "number", ["integer", "null"]):
            entry["minimum"], entry["maximum"] = BOUNDS[name]


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
        return not callable(value)
    except (TypeError, ValueError):
        return False


# -- results as JSON ------------------------------------------------------------------------------

def _plain(value):
    """A JSON value: NaN and infinities as null, tensors and numpy values as lists and numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _table(df, top: int, by: str | None = "value") -> list[dict]:
    """The first `top` rows of `df` (largest |by| first when `by` is a column), as records."""
    if by is not None and by in df.columns:
        df = df.reindex(df[by].abs().sort_values(ascending=False).index)
    return _plain(df.head(top).to_dict("records"))


def result_json(result, top: int = 20, rows=None) -> dict:
    """A `Result` as JSON: its values exactly, its axes and labels, its largest rows (of
    `rows(result.df)` when given), its meta. A patching result that is not normalized ranks its
    rows by `effect`, the value minus the unpatched run's metric (a value near that metric is no
    effect, however large it is)."""
    meta = {k: v for k, v in result.meta.items() if k not in ("labels", "axes", "title") and _json_safe(_plain(v))}
    df, by = (rows(result.df), None) if rows else (result.df, "value")
    if by and "value" in df.columns and not result.meta.get("normalize") \
            and {"clean_metric", "corrupt_metric"} <= set(result.meta):
        noising = result.meta.get("direction") == "noising"
        baseline = result.meta["clean_metric" if noising else "corrupt_metric"]
        df, by = df.assign(effect=df["value"] - baseline), "effect"
    return {"title": result.meta.get("title", ""), "axes": result.meta.get("axes", []),
            "shape": list(result.values.shape), "labels": _plain(result.meta.get("labels", {})),
            "values": _plain(result.values.float()), "table": _table(df, top, by=by), "meta": _plain(meta),
            "summary": result.summary()}


# -- the tools ----------------------------------------------------------------------------------

def _count(value) -> int:
    return 1 if isinstance(value, str) else len(value)


def _top_table(model, prompt: str, k: int) -> list[dict]:
    return _plain(model.top(prompt, k=k)[["token", "token_id", "prob", "logit"]].to_dict("records"))


def _top(model, a):
    return {"table": _top_table(model, a["prompt"], a.get("k", 10))}


def _cache_stats(model, a):
    cache = model.cache(a["prompts"], a["sites"])
    mask = cache.attention_mask.bool()
    stats = {}
    for name in cache.keys():
        x = cache[name].float()
        if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device)]  # real tokens only: padding is not the model's
        flat = x.flatten()
        stats[name] = {"shape": list(cache[name].shape), "mean": flat.mean().item(),
                       "std": flat.std().item() if flat.numel() > 1 else 0.0, "min": flat.min().item(),
                       "max": flat.max().item(),
                       "mean_norm": x.norm(dim=-1).mean().item() if x.dim() > 1 else flat.abs().mean().item()}
    return {"sites": stats}


def _result_tool(method: str, *names, rows=None):
    """A tool body that calls `model.<method>(**arguments)` and returns the Result as JSON
    (`rows(df)`, if given, picks the table's rows first)."""
    def run(model, a):
        kwargs = {n: a[n] for n in names if n in a}
        if "progress" in inspect.signature(getattr(model, method)).parameters:
            kwargs["progress"] = False
        result = getattr(model, method)(**kwargs)
        found = result_json(result, a.get("top", 20), rows)
        return found, result
    return run


def _ablate(model, a):
    kwargs = {n: a[n] for n in ("sites", "mode", "ref", "positions", "seed") if n in a}
    prompt, k = a["measure"], a.get("k", 10)
    before = _top_table(model, prompt, k)
    added = model.ablate(**kwargs)  # the toolbox removes it after the call unless `persistent`
    return {"before": before, "after": _top_table(model, prompt, k), "persistent": _kept(a, added)}


def _kept(a: dict, added: list) -> list[str]:
    """What a call leaves on the model: its interventions when `persistent`, else nothing."""
    return [repr(i) for i in added] if a.get("persistent") else []


def _continuation(model, prompt: str, settings: dict) -> str:
    return str(model.generate(prompt, **settings).df["continuation"].iloc[0])


def _steer_generate(model, a):
    vector = model.steering_vector(a["positive"], a["negative"], a["site"])
    kwargs = {"site": a["site"], "vector": vector, "scale": a.get("scale", 4.0)}
    if a.get("positions") is not None:
        kwargs["positions"] = a["positions"]
    settings = {"max_new_tokens": a.get("max_new_tokens", 20)}
    plain = _continuation(model, a["prompt"], settings)
    added = model.steer(**kwargs)  # removed after the call unless `persistent`
    return {"plain": plain, "steered": _continuation(model, a["prompt"], settings),
            "vector_norm": vector.norm().item(), "persistent": _kept(a, added)}


def _circuit(model, a):
    kwargs = {n: a[n] for n in ("clean", "corrupt", "answer", "wrong", "method", "level", "steps", "metric") if n in a}
    found = model.circuit(**kwargs)
    column = "edge" if "edge" in found.df.columns else "node"
    return {"level": a.get("level", "edge"), "table": _table(found.df, a.get("top", 20), by="score"),
            "n": int(len(found.df)), "column": column, "meta": _plain({k: v for k, v in found.meta.items()
                                                                           if _json_safe(_plain(v))})}


def _graph(model, a, transcoders):
    graph = model.graph(a["prompt"], transcoders)
    return {"top": _plain(graph.top(a.get("top", 20)).to_dict("records")), "scores": _plain(graph.scores),
            "summary": graph.summary()}


def _features(model, a, saes):
    sae = saes[0] if len(saes) == 1 and a.get("site") is None else \
        next((s for s in saes if str(s.site) == a.get("site")), None)
    if sae is None:
        raise AgentError(f"features: site must be one of the SAEs' sites ({', '.join(str(s.site) for s in saes)}), "
                         f"got {a.get('site')!r}")
    result = model.features(a["prompt"], sae, k=a.get("k", 5))
    labels = getattr(sae, "labels", None) or {}
    table = _plain(result.df.to_dict("records"))[: LIMITS["table_rows"] * 4]
    for row in table:
        row["label"] = labels.get(row["feature"])
    return {"sae": sae.name, "site": str(sae.site), "table": table}


def _interchange(model, a):
    from ..causal import tasks

    makers = {"pronouns": (tasks.pronouns, ["gender"]), "ioi": (tasks.ioi, ["position", "token"])}
    if a["task"] not in makers:
        raise AgentError(f"interchange: task must be one of {sorted(makers)}, got {a['task']!r}")
    make, variables = makers[a["task"]]
    if a["variable"] not in variables:
        raise AgentError(f"interchange: the {a['task']} task's variables are {variables}, got {a['variable']!r}")
    data = make().counterfactuals(a.get("n", 64), intervene=a["variable"], seed=a.get("seed", 0)).filter(model)
    result = model.interchange(data, a["sites"], variable=a["variable"], progress=False)
    return {**result_json(result, a.get("top", 20)), "examples": len(data)}, result


def _exec(model, a):
    import ast

    tree = ast.parse(a["code"], mode="exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    scope = {"model": model}
    exec(compile(tree, "<mechnb exec>", "exec"), scope)
    value = eval(compile(ast.Expression(last.value), "<mechnb exec>", "eval"), scope) if last else None
    return {"value": _plain(value) if _json_safe(_plain(value)) else repr(value)}


def _needs(attribute: str, what: str):
    """Offered only when the toolbox has a `what` (given to it, or attached to the model)."""
    return lambda toolbox: None if getattr(toolbox, attribute) else \
        f"no {what} was given to the server or is attached to the model"


_PAIRS = ("clean", "corrupt", "answer", "wrong")
TOOLS = [
    Tool("top", "top", ("prompt", "k"), _top, returns="a table of the next tokens: token, token_id, prob, logit."),
    Tool("cache_stats", "cache", ("prompts", "sites"), _cache_stats,
         returns="per site: shape, mean, std, min, max and mean norm over the last axis."),
    Tool("patch", "patch", (*_PAIRS[:2], "sites", *_PAIRS[2:], "metric", "per_position", "method", "normalize",
                            "direction"),
         _result_tool("patch", "clean", "corrupt", "sites", "answer", "wrong", "metric", "per_position", "method",
                      "normalize", "direction"),
         extra={"top": ({"type": "integer"}, 20), "figure": ({"type": "boolean"}, False)},
         returns="values (the Result's, exactly), axes, labels, the rows of largest effect (value minus the "
                 "unpatched run's metric, unless normalized) and meta (the clean and corrupt metrics)."),
    Tool("path_patch", "path_patch", (*_PAIRS[:2], "senders", "receivers", *_PAIRS[2:], "metric", "normalize",
                                      "freeze", "direction"),
         _result_tool("path_patch", "clean", "corrupt", "senders", "receivers", "answer", "wrong", "metric",
                      "normalize", "freeze", "direction"),
         extra={"top": ({"type": "integer"}, 20), "figure": ({"type": "boolean"}, False)},
         returns="values, axes, labels, the rows of largest effect (as for patch) and meta."),
    Tool("ablate", "ablate", ("sites", "mode", "ref", "positions", "seed"), _ablate,
         extra={"measure": ({"type": "string", "minLength": 1}, inspect.Parameter.empty),
                "k": ({"type": "integer"}, 10), "persistent": ({"type": "boolean"}, False)},
         returns="the next-token table of `measure` before and with the ablation."),
    Tool("steer_generate", "steering_vector", ("positive", "negative", "site"), _steer_generate,
         extra={"prompt": ({"type": "string", "minLength": 1}, inspect.Parameter.empty),
                "scale": ({"type": "number"}, 4.0), "max_new_tokens": ({"type": "integer"}, 20),
                "persistent": ({"type": "boolean"}, False)},
         returns="the steering vector's norm and the greedy continuation of `prompt` without and with "
                 "`scale` times it added at `site`."),
    Tool("dla", "dla", ("prompt", "answer", "wrong"), _result_tool("dla", "prompt", "answer", "wrong"),
         extra={"top": ({"type": "integer"}, 20), "figure": ({"type": "boolean"}, False)},
         returns="values (layer x (heads + MLP)), the largest rows and meta (the terms that sum to the total)."),
    Tool("logit_lens", "logit_lens", ("prompt", "k"), _result_tool("logit_lens", "prompt", "k", rows=lambda df: df[df.pos == df.pos.max()]),
         extra={"top": ({"type": "integer"}, 20), "figure": ({"type": "boolean"}, False)},
         returns="values per layer and position, the last position's row at every layer, and meta."),
    Tool("heads", "detect_heads", ("kind", "n_samples", "seq_len", "seed"),
         _result_tool("detect_heads", "kind", "n_samples", "seq_len", "seed"),
         extra={"top": ({"type": "integer"}, 20), "figure": ({"type": "boolean"}, False)},
         returns="scores per layer and head, the highest rows first."),
    Tool("circuit", "circuit", (*_PAIRS, "method", "level", "steps", "metric"), _circuit,
         extra={"top": ({"type": "integer"}, 20)}, schema_names={"metric": "circuit_metric"},
         returns="the highest-scoring edges (or nodes) and how many were scored."),
    Tool("graph", "graph", ("prompt",), _graph, extra={"top": ({"type": "integer"}, 20)},
         available=_needs("transcoders", "transcoder set"),
         returns="the features of most influence on the logits and the graph's replacement and completeness."),
    Tool("features", "features", ("prompt", "k"), _features,
         extra={"site": ({"type": ["string", "null"]}, None)}, available=_needs("saes", "SAE"),
         returns="the most active features of the attached SAE at each token, with their labels where known."),
    Tool("interchange", "interchange", ("sites", "variable"), _interchange,
         extra={"task": ({"type": "string", "enum": ["pronouns", "ioi"]}, inspect.Parameter.empty),
                "n": ({"type": "integer"}, 64), "seed": ({"type": "integer"}, 0), "top": ({"type": "integer"}, 20)},
         returns="interchange intervention accuracy per site, exactly as the API gives it."),
]
TOOLS.append(Tool("clear", "clear", (), lambda model, a, toolbox: {"removed": toolbox.clear()},
                  description="Remove the interventions earlier calls of this client kept (persistent=true); "
                              "nothing else on the model is touched.",
                  returns="how many were removed."))
EXEC = Tool("exec", "trace", (), _exec, extra={"code": ({"type": "string", "minLength": 1}, inspect.Parameter.empty)},
            returns="the value of the code's last expression (as JSON, or its repr).")


# -- the toolbox: validation, scoping, limits ---------------------------------------------------

@dataclass
class Call:
    """One call as it ran: what the log and the transcript keep."""

    id: int
    tool: str
    arguments: dict
    result: dict | None
    error: str | None
    seconds: float
    figure: str | None = None


class Toolbox:
    """The tools on one model: `schemas()` for a client, `call(name, arguments)` for a call.

    Calls run one at a time (a lock: the kernel's cells and a client share the model) and each
    leaves the model as it found it unless it asked for `persistent` interventions. `log` holds
    every call; `on_call(call)`, if given, sees each as it ends (the notebook's live log)."""

    def __init__(self, model, allow_exec: bool = False, limits: dict | None = None, on_call=None,
                 saes=(), transcoders=None):
        from ..model import Model

        self.model, self.allow_exec = model, allow_exec
        self._saes, self._transcoders = list(saes), transcoders
        self.persistent: list = []  # the interventions persistent calls kept, which `clear` removes
        self._schemas: dict[str, dict] = {}
        self.limits = {**LIMITS, **(limits or {})}
        self.lock = threading.RLock()
        self.log: list[Call] = []
        self.figures: dict[str, bytes] = {}
        self.on_call = on_call
        self._class = Model
        self._tools = {tool.name: tool for tool in TOOLS + ([EXEC] if allow_exec else [])}

    @property
    def saes(self) -> list:
        """The SAEs `features` reads: those given, then those attached to the model."""
        return self._saes + [s for s in self.model.saes if all(s is not t for t in self._saes)]

    @property
    def transcoders(self):
        """The transcoder set `graph` builds on: the one given, else the first attached."""
        return self._transcoders if self._transcoders is not None else next(iter(self.model.transcoder_sets), None)

    def tools(self) -> dict[str, Tool]:
        """The tools on offer now (graph needs a transcoder set, features an SAE)."""
        return {name: tool for name, tool in self._tools.items()
                if tool.available is None or tool.available(self) is None}

    def schemas(self) -> list[dict]:
        return [self._schema(tool) for tool in self.tools().values()]

    def _schema(self, tool: Tool) -> dict:
        """A tool's schema, read from its method's signature and docstring once per toolbox."""
        if tool.name not in self._schemas:
            self._schemas[tool.name] = tool.schema(self._class)
        return self._schemas[tool.name]

    def call(self, name: str, arguments: dict | None = None) -> dict:
        """Run tool `name`; its JSON result. Raises `AgentError` (one line) on any failure."""
        started = time.perf_counter()
        arguments = dict(arguments or {})
        record = Call(len(self.log) + 1, name, arguments, None, None, 0.0)
        try:
            tool = self._tool(name)
            arguments = self._validate(tool, arguments)
            record.arguments = arguments
            with self._scoped(name):
                result, figure = self._run(tool, arguments)
            if figure is not None:
                record.figure = result["figure"] = self._keep(figure, name, record.id)
            record.result = result
            return result
        except AgentError as error:
            record.error = str(error)
            raise
        except MechnbError as error:
            record.error = f"{name}: {error}"
            raise AgentError(record.error) from None
        except Exception as error:  # a torch or nnsight error on input the checks let through
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            record.error = f"{name} failed: {type(error).__name__}: {text}"
            raise AgentError(record.error) from None
        finally:
            record.seconds = round(time.perf_counter() - started, 3)
            self.log.append(record)
            if self.on_call is not None:
                self.on_call(record)

    def clear(self) -> int:
        """Remove the interventions persistent calls kept (the notebook's own stay); how many."""
        with self.lock:
            active = [i for i in self.persistent if any(i is j for j in self.model.interventions)]
            if active:
                self.model.remove(active)
            self.persistent = []
            return len(active)

    # -- inside a call ---------------------------------------------------------------------------

    def _tool(self, name) -> Tool:
        if name in self._tools and name not in self.tools():
            raise AgentError(f"tool {name} is not available: {self._tools[name].available(self)}")
        if name not in self._tools:
            hint = " (exec is off: start the server with --allow-exec to run code)" if name == "exec" else ""
            raise AgentError(f"no tool named {name!r}{hint}; the tools are {', '.join(sorted(self.tools()))}")
        return self._tools[name]

    def _validate(self, tool: Tool, arguments: dict) -> dict:
        import jsonschema

        schema = self._schema(tool)["input_schema"]
        try:
            jsonschema.validate(arguments, schema)
        except jsonschema.ValidationError as error:
            where = ".".join(str(p) for p in error.absolute_path) or "arguments"
            raise AgentError(f"{tool.name}: {where}: {error.message}") from None
        for name, entry in schema["properties"].items():
            if name not in arguments and "default" in entry:
                arguments[name] = entry["default"]
        self._check_size(tool, arguments)
        return arguments

    def _check_size(self, tool: Tool, a: dict) -> None:
        limits = self.limits
        texts = []
        for name in ("prompt", "prompts", "clean", "corrupt", "positive", "negative", "ref", "measure"):
            value = a.get(name)
            if value is None:
                continue
            if not isinstance(value, str) and len(value) > limits["prompts"]:
                raise AgentError(f"{tool.name}: {name} has {len(value)} prompts, more than the limit of "
                                 f"{limits['prompts']}")
            texts += [value] if isinstance(value, str) else list(value)
        tokenizer = getattr(self.model, "tokenizer", None)
        for text in texts:
            n = len(tokenizer.encode(text)) if tokenizer is not None else len(text)
            if n > limits["prompt_tokens"]:
                raise AgentError(f"{tool.name}: a prompt of {n} tokens is longer than the limit of "
                                 f"{limits['prompt_tokens']}")
        for name in ("sites", "senders", "receivers"):
            if name in a:
                try:
                    n = self._n_sites(a[name])
                except AgentError as error:
                    raise AgentError(f"{tool.name}: {name}: {error}") from None
                if n > limits["sites"]:
                    raise AgentError(f"{tool.name}: {name} expand to {n} sites, more than the limit of "
                                     f"{limits['sites']}: ask for fewer layers or heads")
        if tool.name == "exec" and len(a["code"]) > limits["exec_chars"]:
            raise AgentError(f"exec: {len(a['code'])} characters of code, more than the limit of "
                             f"{limits['exec_chars']}")

    def _n_sites(self, patterns) -> int:
        from ..core.sites import parse

        patterns = [patterns] if isinstance(patterns, str) else patterns
        try:
            return sum(len(parse(pattern).expand(self.model)) for pattern in patterns)
        except MechnbError as error:
            raise AgentError(f"{error}") from None  # the site's own message; the caller names the tool

    def _scoped(self, name: str):
        """The call's scope: the model lock, the time budget, and the interventions and edits put
        back as they were if the call fails."""
        from contextlib import contextmanager

        from ..core.memory import time_budget

        @contextmanager
        def scope():
            if not self.lock.acquire(timeout=self.limits["seconds"]):
                raise AgentError(f"{name}: the model was busy for {self.limits['seconds']:.0f} s with another call")
            try:
                interventions, edits = list(self.model.interventions), list(self.model.edits)
                try:
                    with time_budget(self.limits["seconds"], f"the {name} tool's call"):
                        yield
                except BaseException:
                    for added in [i for i in self.model.interventions if all(i is not j for j in interventions)]:
                        self.model.remove(added)
                    for edit in [e for e in self.model.edits if all(e is not f for f in edits)]:
                        edit.revert()
                    raise
            finally:
                self.lock.release()

        return scope()

    def _run(self, tool: Tool, arguments: dict) -> tuple[dict, bytes | None]:
        """The tool's JSON, and its Result's figure as PNG bytes when `figure` was asked for."""
        interventions = list(self.model.interventions)
        drawn = arguments.get("figure", False)
        arguments = {k: v for k, v in arguments.items() if k != "figure"}
        reads = {"graph": (self.transcoders,), "features": (self.saes,), "clear": (self,)}.get(tool.name, ())
        result = tool.run(self.model, arguments, *reads)
        result, shown = result if isinstance(result, tuple) else (result, None)
        stray = [i for i in self.model.interventions if all(i is not j for j in interventions)]
        if arguments.get("persistent"):
            self.persistent += stray
        else:
            for added in stray:  # a tool that is not persistent leaves nothing behind
                self.model.remove(added)
        png = shown.png() if drawn and shown is not None else None
        return result, png

    def _keep(self, png: bytes, name: str, number: int) -> str:
        """Keep a call's figure; its resource URI."""
        uri = f"mechnb://figures/{number}-{name}.png"
        self.figures[uri] = png
        return uri
