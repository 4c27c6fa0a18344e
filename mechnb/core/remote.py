"""Remote execution: models beyond this machine, run on NDIF through nnsight.

The problem: a 70B model does not fit here, but NDIF (https://ndif.us) serves it, and
nnsight can ship a trace there. The mechanism: `mechnb.load(name, remote=True)` builds
the model's structure on the `meta` device from its config (no weights; the config and
tokenizer come from the local Hugging Face cache or the hub) and wraps it in nnsight;
mechnb's one trace entry point (`mechnb.core.trace.Trace`) then passes `remote=True` to
nnsight, which sends the block's source and the values it uses to NDIF, where the hub
model of the same name runs it, and sends back the values the block saved. The block
calls mechnb (`model["resid_post.5"]`), which NDIF does not have installed, so mechnb's
code travels with it, by value (`nnsight.register`).

    >>> model = mechnb.load("meta-llama/Llama-3.1-70B", remote=True)   # NDIF_API_KEY set
    >>> with model.trace("The Eiffel Tower is located in the city of"):
    ...     h = model["resid_post.40@-1"].save()
    ...     model["mlp_out.20"] = 0
    ...     logits = model["logits@-1"].save()
    >>> model.top("The Eiffel Tower is located in the city of")       # also remote

What works remotely: whatever runs through one trace of the model, that is
`model.trace`, `model.cache`, `model.top`, `model.steering_vector`,
`model.activations` and `model.coactivation`, on every site but `head`, `pattern` and
`sae` (those live in mechnb's own attention function and hook points, which NDIF's copy
of the model does not run). Everything else (`UNAVAILABLE`) runs the model's layers,
reads its weights, takes gradients, or hooks modules in this process; those methods
raise `RemoteError` before anything is sent, and any module of a remote model that is
called here raises it too.

Errors: an unreachable host, a refused key or a failed job become one-line
`RemoteError`s that name the host, the reason and what to do. Before each trace a TCP
connection to the host is tried for at most `CONNECT_TIMEOUT` seconds (DNS included),
so an offline machine gets its answer in seconds, not after nnsight's retries; the
websocket nnsight then opens times out after `HANDSHAKE_TIMEOUT`.

Gotchas: NDIF must serve the model (`nnsight.ndif.status()` lists them); the repo id is
sent as written, without asking the hub for its canonical spelling. The API key comes
from `NDIF_API_KEY` or nnsight's config (`nnsight.CONFIG.set_default_api_key(key)`),
read when the model is loaded.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading

from .errors import RemoteError

CONNECT_TIMEOUT = 5.0  # seconds to resolve and reach the NDIF host before a trace
HANDSHAKE_TIMEOUT = 15.0  # seconds nnsight's websocket waits for a silent host
KEY_HELP = ("set the NDIF_API_KEY environment variable, or call "
            "nnsight.CONFIG.set_default_api_key('...') once (a key is free at https://login.ndif.us)")
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
                   errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT}
LOCAL_HELP = "load the model locally (mechnb.load(name) without remote=True) to use it"

# Method -> why it cannot run on NDIF. The methods not listed run through one trace.
UNAVAILABLE = {
    "trace(grad=True)": "gradients through the model need its modules in this process",
    "patch": "the batched patching engine runs the model's layers one by one in this process "
             "(and method='attribution' takes gradients through them)",
    "path_patch": "it runs on the batched patching engine, which calls the model's layers here",
    "causal_trace": "it runs on the batched patching engine, which calls the model's layers here",
    "circuit": "edge scores take gradients through the model's layers and mechnb's attention function here",
    "attribute": "attribution takes gradients through the model's modules here",
    "gim": "GIM's backward rules live in mechnb's attention function and hooks in this process",
    "generate": "mechnb's generation loop calls the model here, one step at a time, with its interventions",
    "edit": "ROME rewrites a weight, and the weights are on NDIF",
    "ov": "it reads the attention weights, and the weights are on NDIF",
    "qk": "it reads the attention weights, and the weights are on NDIF",
    "composition": "it reads the attention weights, and the weights are on NDIF",
    "logit_lens": "it applies the final norm and the unembedding here, and their weights are on NDIF",
    "dla": "it needs per-head outputs (hook points in mechnb's attention function) and the weights",
    "attention": "patterns live in mechnb's own attention function, which NDIF's model does not run",
    "detect_heads": "head scores read patterns, which live in mechnb's own attention function",
    "collect": "it runs the model's first layers here and stops early",
    "add": "persistent interventions are PyTorch hooks on modules in this process; write values "
           "inside `with model.trace(prompt):` instead",
    "ablate": "persistent interventions are PyTorch hooks on modules in this process; write the value "
              "inside `with model.trace(prompt):` instead (model['mlp_out.3'] = 0)",
    "hook": "persistent hooks are PyTorch hooks on modules in this process; apply your function inside "
            "`with model.trace(prompt):` instead (model[site] = fn(model[site]))",
    "steer": "persistent steering is a PyTorch hook on a module in this process; add the vector inside "
             "`with model.trace(prompt):` instead (model[site] = model[site] + scale * vector)",
    "attach": "an SAE is spliced in as a module in this process",
    "features": "an SAE is spliced in as a module in this process",
    "explore": "the explorer reads attention patterns and ablates heads live",
    "graph": "an attribution graph freezes attention patterns and norm scales with hooks in this process "
             "and runs hundreds of backward passes over them",
}
UNAVAILABLE_SITES = {
    "head": "per-head outputs pass through hook points inside mechnb's own attention function",
    "pattern": "patterns pass through hook points inside mechnb's own attention function",
    "sae": "SAE features are spliced in as modules in this process",
}


def unavailable(method: str) -> RemoteError:
    """The error for a method (a key of `UNAVAILABLE`) called on a remote model."""
    return RemoteError(f"{method} is not available with remote=True: {UNAVAILABLE[method]}; "
                       f"{LOCAL_HELP}")


def local_only(method):
    """Mark a method (a function of the model) that needs the model in this process: on a
    remote model it raises its `UNAVAILABLE` reason before anything is sent."""
    import functools

    @functools.wraps(method)
    def checked(model, *args, **kwargs):
        model.require_local(method.__name__)
        return method(model, *args, **kwargs)

    return checked


def check_site(site) -> None:
    """`RemoteError` for a site a remote model cannot read or write (see `UNAVAILABLE_SITES`)."""
    if site.kind in UNAVAILABLE_SITES:
        raise RemoteError(f"{site} is not available with remote=True: {UNAVAILABLE_SITES[site.kind]}; "
                          f"read attn_out, mlp_out, neuron or resid sites instead, or {LOCAL_HELP}")


def api_key() -> str:
    """The NDIF API key from `NDIF_API_KEY` or nnsight's config; `RemoteError` if there is none.

    nnsight reads `NDIF_API_KEY` once, when it is imported; a key set later is handed to
    its config here (for this process only), so that its requests carry it.
    """
    from nnsight import CONFIG

    key = os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    if not key:
        raise RemoteError(f"remote=True needs an NDIF API key and none is set: {KEY_HELP}")
    CONFIG.API.APIKEY = key
    return key


def host() -> str:
    """The NDIF API address nnsight sends to (`NDIF_HOST` or nnsight's config)."""
    from nnsight import CONFIG

    return CONFIG.API.HOST


def skeleton(config):
    """A weightless model of `config` on the meta device, named by `config._name_or_path`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None)  # the checkpoint's own, as NDIF is likely to hold it
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype if isinstance(dtype, torch.dtype)
                                                    else torch.float32)
    return hf_model.eval()


def wrap(hf_model, tokenizer):
    """The nnsight model of a remote `Model`: never run here (a call raises `RemoteError`)."""
    import nnsight
    from nnsight.modeling import huggingface

    def refuse(module, args, kwargs):
        raise RemoteError(
            f"{type(module).__name__} of a remote=True model was called in this process, where it "
            f"has no weights: run it inside `with model.trace(prompt):` (which runs on NDIF), or "
            f"{LOCAL_HELP}")

    for module in hf_model.modules():
        module.register_forward_pre_hook(refuse, with_kwargs=True)
    repo_id = hf_model.name_or_path
    # nnsight asks the hub for the canonical spelling of the id before each request;
    # NDIF knows the id as the user wrote it, and the hub may be out of reach.
    huggingface._ID_CACHE.setdefault(repo_id, repo_id)
    # The body of a trace calls mechnb, which NDIF does not have: ship its code by value.
    nnsight.register("mechnb")
    return nnsight.TransformersModel(hf_model, tokenizer=tokenizer, device="meta")


def check_reachable(url: str | None = None, timeout: float | None = None) -> None:
    """`RemoteError` unless a TCP connection to the host of `url` (default: NDIF's) opens
    within `timeout` seconds (default `CONNECT_TIMEOUT`), name resolution included."""
    url = url or host()
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    name, port = _address(url)
    outcome: list = []

    def attempt():
        # Every failure is recorded, none raised: an exception escaping a thread is lost to
        # the caller and reported out of context (a test's, a kernel's) long after.
        try:
            socket.create_connection((name, port), timeout=timeout).close()
            outcome.append(None)
        except Exception as error:
            outcome.append(error)

    # getaddrinfo takes no timeout, so the whole attempt runs in a thread we stop waiting for.
    worker = threading.Thread(target=attempt, daemon=True, name="mechnb-ndif-check")
    worker.start()
    worker.join(timeout + 0.5)
    if outcome and outcome[0] is None:
        return
    error = outcome[0] if outcome else TimeoutError(f"no answer within {timeout:g} s")
    if not isinstance(error, OSError):
        raise RemoteError(f"cannot check NDIF at {url}: {type(error).__name__}: {error}. {_network_help()}")
    raise RemoteError(f"cannot reach NDIF at {url}: {_reason(error, name, port)}. {_network_help()}")


def _address(url: str) -> tuple[str, int]:
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("["):  # an IPv6 literal
        name, _, port = hostport[1:].partition("]")
        port = port.lstrip(":")
    else:
        name, _, port = hostport.partition(":")
    return name, int(port) if port else (443 if scheme == "https" else 80)


def _network_help() -> str:
    return ("Check the network connection (and NDIF_HOST if you set it), or drop remote=True "
            "to run a model that fits here")


def _reason(error: BaseException, name: str, port: int) -> str:
    """A few words for a connection failure."""
    if isinstance(error, socket.gaierror):
        return f"the name {name} does not resolve ({error.strerror or error})"
    if isinstance(error, ConnectionRefusedError):
        return f"{name}:{port} refused the connection"
    if isinstance(error, (TimeoutError, socket.timeout)):
        return f"{name}:{port} did not answer in time"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{name}:{port} is unreachable ({text})"


def translate(error: BaseException, model) -> BaseException:
    """The one-line `RemoteError` for an error of a remote trace; mechnb errors unchanged."""
    from .errors import MechnbError

    if isinstance(error, MechnbError) or not isinstance(error, Exception):
        return error
    url = host()
    name, port = _address(url)
    status = _status(error)
    if status in (401, 403):
        return RemoteError(f"NDIF at {url} refused the request (HTTP {status}: the API key is missing, "
                           f"wrong or not allowed this model): {KEY_HELP}")
    if status is not None:
        return RemoteError(f"NDIF at {url} answered HTTP {status} ({_detail(error)}): try again later, "
                           f"or check that NDIF serves {model.name!r} (nnsight.ndif.status())")
    network = _network_error(error)
    if network is not None:
        return RemoteError(f"cannot reach NDIF at {url}: {_reason(network, name, port)}. {_network_help()}")
    from nnsight.intervention.backends.remote import RemoteError as JobError

    if isinstance(error, JobError):
        return RemoteError(f"the trace failed on NDIF ({url}): {_detail(error)}; fix the trace, or "
                           f"check that NDIF serves {model.name!r} (nnsight.ndif.status())")
    return error


def _chain(error: BaseException):
    """`error` and the errors it was raised from."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    """The HTTP status behind an error (websocket handshake or httpx), if any."""
    for each in _chain(error):
        code = getattr(each, "status_code", None)
        if isinstance(code, int):
            return code
        response = getattr(each, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int) and code >= 400:
            return code
    return None


def _network_error(error: BaseException) -> BaseException | None:
    """The connection-level failure behind an error (DNS, refused, timeout), if any."""
    import websocket

    for each in _chain(error):
        if isinstance(each, websocket.WebSocketAddressException):
            return socket.gaierror(str(each))
        if isinstance(each, websocket.WebSocketTimeoutException):
            return TimeoutError(str(each))
        if isinstance(each, (socket.gaierror, ConnectionError, TimeoutError, ssl.SSLError,
                             websocket.WebSocketConnectionClosedException)):
            return each
        if isinstance(each, OSError) and each.errno in _NETWORK_ERRNOS:
            return each
        if type(each).__module__.startswith("httpx") and type(each).__name__ in (
                "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
                "ReadError", "WriteError", "RemoteProtocolError", "NetworkError", "TimeoutException"):
            return TimeoutError(str(each)) if "Timeout" in type(each).__name__ else OSError(str(each))
    return None


def _detail(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    line = next((part for part in text.splitlines() if part.strip()), text)
    return line.strip()[:300]


class Connection:
    """A context manager around one remote trace's run: nnsight's websocket times out
    after `HANDSHAKE_TIMEOUT` instead of waiting forever for a silent host."""

    def __enter__(self):
        import websocket

        self.previous = websocket.getdefaulttimeout()
        websocket.setdefaulttimeout(HANDSHAKE_TIMEOUT)
        return self

    def __exit__(self, *exc) -> None:
        import websocket

        websocket.setdefaulttimeout(self.previous)
