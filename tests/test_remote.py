"""`mechnb.load(name, remote=True)`: traces on NDIF, clear errors offline, no network otherwise.

NDIF is out of reach here, so the hub id names a tiny Llama whose config and tokenizer
sit in a temporary Hugging Face cache, and NDIF itself is played by a fresh Python
process that cannot import mechnb (as NDIF cannot): it receives the serialized trace
exactly as nnsight would send it, runs it on a stock transformers model with the
same weights, and sends the saved values back.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

import mechnb
from conftest import PARIS, PROMPT, json_server
from mechnb.core import remote
from mechnb import RemoteError

REPO = "mechnb-test/tiny-llama"
UNREACHABLE = "https://ndif.invalid"  # .invalid never resolves (RFC 2606)

# NDIF, played by a process without mechnb: one serialized request per line of stdin.
SERVER = r'''
import importlib.abc, sys, traceback

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "mechnb":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Absent())
import torch, nnsight
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import _saves, dec, inc

model = nnsight.TransformersModel(sys.argv[1], dispatch=True, task="text-generation")
print("ready", flush=True)
for line in sys.stdin:
    blob_path, out_path = line.split()
    try:
        with open(blob_path, "rb") as f:
            restored = RequestModel.deserialize(f.read(), model._remoteable_persistent_objects())
        inc()
        try:
            restored.execute(restored.info.code)
            saved = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in _saves()}
        finally:
            dec()
        torch.save(saved, out_path)
        print("ok", flush=True)
    except Exception as error:
        print("error", f"{type(error).__name__}: {error}".replace("\n", " "), flush=True)
import gc
gc.freeze()  # the test waits for this process to exit: skip the last collections (seconds)
'''


@pytest.fixture(scope="session")
def weights(saved):
    """A saved tiny Llama: what NDIF would hold under `REPO`."""
    return saved


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, weights):
    """A Hugging Face cache holding `REPO`'s config and tokenizer (no weights)."""
    import shutil

    root = tmp_path_factory.mktemp("hf-cache")
    repo = root / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in weights.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return root


@pytest.fixture
def ndif(monkeypatch, hub_cache):
    """A key in NDIF_API_KEY, the cache above, and no way to reach the hub."""
    import huggingface_hub.constants
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", CONFIG.API.APIKEY)  # restored afterwards
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))


@pytest.fixture
def model(ndif):
    return mechnb.load(REPO, remote=True)


# The tests on the simulated NDIF run on one test worker (`make test` runs four), which starts
# the server once: it imports torch and nnsight, several seconds.
ON_ONE_WORKER = pytest.mark.xdist_group("simulated-ndif")


@pytest.fixture(scope="session")
def server(weights, tmp_path_factory):
    """The process that plays NDIF, started once per test process (it imports torch and nnsight,
    about 9 s): its tests run between other files' on one worker, and a module's fixtures would
    start it again after each switch."""
    script = tmp_path_factory.mktemp("ndif") / "server.py"
    script.write_text(SERVER)
    process = subprocess.Popen([sys.executable, str(script), str(weights)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    yield process
    process.stdin.close()
    process.wait(timeout=30)


class SimulatedNDIF:
    """An nnsight backend that sends the serialized trace to `server`, as RemoteBackend
    sends it to NDIF, and pushes the saved values back into the caller's frame."""

    def __init__(self, process, folder):
        self.process, self.folder = process, folder

    def __call__(self, tracer):
        from nnsight.intervention.backends.remote import RemoteError as JobError
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import mark
        from nnsight.tracing.util import push

        blob, out = self.folder / "request", self.folder / "result"
        blob.write_bytes(RequestModel.serialize(tracer))
        self.process.stdin.write(f"{blob} {out}\n")
        self.process.stdin.flush()
        status, _, message = self.process.stdout.readline().strip().partition(" ")
        if status != "ok":
            raise JobError(message)  # what nnsight raises when a job fails on NDIF
        result = torch.load(out, weights_only=False)
        for value in result.values():
            mark(value)
        push(tracer.info.frame, result)


@pytest.fixture
def on_ndif(model, server, tmp_path, monkeypatch):
    """The remote model, its traces sent to the simulated NDIF."""
    monkeypatch.setattr(remote, "check_reachable", lambda *args, **kwargs: None)
    # On the class: the model's own attributes travel with the request.
    monkeypatch.setattr(type(model.nn), "_remote_backend", lambda *args, **kwargs: SimulatedNDIF(server, tmp_path))
    return model


@pytest.fixture(scope="module")
def local(weights):
    return mechnb.load(weights, device="cpu")


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# -- loading ----------------------------------------------------------------------------


def test_remote_load_builds_the_model_without_weights(model):
    from nnsight import CONFIG

    assert CONFIG.API.APIKEY == "test-key"  # nnsight sends the key from NDIF_API_KEY
    assert model.remote and model.arch.name == "llama" and model.n_layers == 3
    assert {p.device.type for p in model.hf.parameters()} == {"meta"}
    assert model.info()["device"] == "NDIF (https://api.ndif.us)" and model.devices == ["ndif"]
    assert json.loads(model.nn.to_model_key().split(":", 1)[1])["repo_id"] == REPO
    assert model.nn._remoteable_get_env()["attn_implementation"] != "mechnb"  # NDIF runs the stock model
    assert not hasattr(model.hf.model.layers[0].self_attn, "hook_z")


def test_a_missing_api_key_is_a_clear_error(ndif, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteError) as error:
        mechnb.load(REPO, remote=True)
    assert "NDIF_API_KEY" in one_line(error) and "set_default_api_key" in str(error.value)


def test_the_key_may_come_from_nnsights_config(ndif, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(CONFIG.API, "APIKEY", "from-config")
    assert mechnb.load(REPO, remote=True).remote


def test_a_hub_id_outside_the_cache_offline_is_a_clear_error(ndif):
    with pytest.raises(RemoteError) as error:
        mechnb.load("mechnb-test/not-cached", remote=True)
    assert "not in the local Hugging Face cache" in one_line(error) and "HF_HUB_OFFLINE" in str(error.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(name=None), "needs the hub id"),
    (dict(name=REPO, device="cuda"), "drop device="),
    (dict(name=REPO, device_map="auto"), "drop device_map="),
    (dict(name=REPO, dtype="float16"), "drop dtype="),
])
def test_remote_load_contradictions_are_clear_errors(ndif, kwargs, words):
    with pytest.raises(RemoteError, match=words) as error:
        mechnb.load(remote=True, **kwargs)
    one_line(error)


def test_a_local_directory_cannot_run_remotely(ndif, weights):
    with pytest.raises(RemoteError, match="is local"):
        mechnb.load(weights, remote=True)


# -- offline: one line, in seconds, model clean ---------------------------------------------


def remote_trace(model, seconds: float = 30):
    """A remote trace that must end (with an error) within `seconds`: a hang fails the test.

    The bound only tells a hang from an answer; the timeouts under test are about 1 s, so
    a loaded machine is far from it."""
    import signal

    def hung(signum, frame):
        raise AssertionError(f"the remote trace hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        with model.trace(PROMPT):
            h = model["resid_post.1"].save()
        return h
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        assert time.perf_counter() - start < seconds


def test_offline_remote_trace_fails_in_seconds_and_leaves_the_model_clean(model, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", UNREACHABLE)
    for _ in range(2):  # the second call is not "a trace is already running"
        with pytest.raises(RemoteError) as error:
            remote_trace(model)
        text = one_line(error)
        assert "ndif.invalid" in text and "does not resolve" in text and "drop remote=True" in text
    assert model._trace is None and model.context is None and model.interventions == []


def test_nnsights_own_connection_errors_are_translated(model, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", UNREACHABLE)
    monkeypatch.setattr(remote, "check_reachable", lambda *args, **kwargs: None)  # straight to nnsight
    with pytest.raises(RemoteError) as error:
        remote_trace(model)
    assert "cannot reach NDIF at https://ndif.invalid" in one_line(error)
    assert model._trace is None


def test_a_name_lookup_that_hangs_is_cut_short(model, monkeypatch):
    import threading

    released = threading.Event()

    def stuck(*args, **kwargs):  # getaddrinfo takes no timeout: a dead resolver hangs it
        released.wait(120)
        raise socket.gaierror("released by the test")

    monkeypatch.setattr(socket, "create_connection", stuck)
    monkeypatch.setattr(remote, "CONNECT_TIMEOUT", 0.5)
    try:
        with pytest.raises(RemoteError, match="did not answer in time") as error:
            remote_trace(model)
        assert "api.ndif.us:443" in one_line(error)
    finally:
        # The check's thread ends inside this test, not in a later one that no longer patches
        # the socket module.
        released.set()
        checks = [t for t in threading.enumerate() if t.name == "mechnb-ndif-check"]
        for thread in checks:
            thread.join(5)
        assert not any(thread.is_alive() for thread in checks)


def test_an_unexpected_failure_of_the_reachability_check_is_one_line(model, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: None)  # no socket back
    with pytest.raises(RemoteError, match="cannot check NDIF at") as error:
        remote.check_reachable(timeout=1)
    one_line(error)


def local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_connection_is_a_clear_error(model, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{local_port()}")
    with pytest.raises(RemoteError, match="refused the connection") as error:
        remote_trace(model)
    one_line(error)


def test_a_silent_host_times_out_instead_of_hanging(model, monkeypatch):
    from nnsight import CONFIG

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections, never answers
    try:
        monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(remote, "HANDSHAKE_TIMEOUT", 1.0)
        with pytest.raises(RemoteError, match="did not answer in time") as error:
            remote_trace(model)
        one_line(error)
    finally:
        listener.close()
    assert model._trace is None


def test_a_refused_key_names_ndif_api_key(model, monkeypatch):
    from nnsight import CONFIG

    with json_server(lambda body: (401, {"detail": "Invalid API key"})) as url:
        monkeypatch.setattr(CONFIG.API, "HOST", url)
        with pytest.raises(RemoteError) as error:
            remote_trace(model)
        text = one_line(error)
        assert "HTTP 401" in text and "NDIF_API_KEY" in text


# -- what runs remotely, and what says it does not ------------------------------------------


def test_every_method_that_needs_local_weights_says_so_before_sending(model, monkeypatch):
    import inspect

    sent = []
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: sent.append(args))
    for method in remote.UNAVAILABLE:
        if method == "trace(grad=True)":
            with pytest.raises(RemoteError, match=r"trace\(grad=True\) is not available with remote=True"):
                model.trace(PROMPT, grad=True)
            continue
        function = getattr(model, method)
        required = [p for p in inspect.signature(function).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        with pytest.raises(RemoteError, match=f"{method} is not available with remote=True") as error:
            function(*["x"] * len(required))
        assert "without remote=True" in one_line(error)
    with pytest.raises(RemoteError, match="head.1 is not available with remote=True"):
        model.cache(PROMPT, ["resid_pre.1", "head.1.2"])
    with pytest.raises(RemoteError, match="has no weights"):
        model.hf(input_ids=torch.tensor([[1, 2]]))
    assert sent == [] and model._trace is None


@ON_ONE_WORKER
def test_a_remote_trace_runs_where_mechnb_is_not_installed(on_ndif, local):
    def run(model):
        with model.trace([PROMPT, PARIS]):
            model["mlp_out.0@-1"] = 0
            early = model["resid_post.0:2"].save()
            model["neuron.2.7"] = model["neuron.2.7"] * 3
            logits = model["logits@-1"].save()
        return early, logits

    (early, logits), (expected_early, expected_logits) = run(on_ndif), run(local)
    assert early.shape == (2, 2, len(on_ndif.tokens(PROMPT)), on_ndif.d_model) and not logits.requires_grad
    assert torch.allclose(early, expected_early, atol=1e-5)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


@ON_ONE_WORKER
def test_cache_top_steering_vectors_and_activation_views_run_remotely(on_ndif, local):
    sites = ["embed", "resid_pre.*", "attn_out.1", "neuron.2", "logits"]
    cache, expected = on_ndif.cache([PROMPT, PARIS], sites), local.cache([PROMPT, PARIS], sites)
    for site in ("embed", "resid_pre.*@-1", "attn_out.1", "neuron.2.5", "logits"):
        assert torch.allclose(cache[site], expected[site], atol=1e-5), site
    assert on_ndif.top(PARIS, 5).token_id.tolist() == local.top(PARIS, 5).token_id.tolist()
    vector = on_ndif.steering_vector([PROMPT], [PARIS], "resid_post.1")
    assert torch.allclose(vector, local.steering_vector([PROMPT], [PARIS], "resid_post.1"), atol=1e-5)
    shown = on_ndif.activations("neuron.1.3", [PROMPT, PARIS])
    assert torch.allclose(shown.values, local.activations("neuron.1.3", [PROMPT, PARIS]).values, atol=1e-5)
    pca = on_ndif.coactivation("mlp_out.1", [PROMPT, PARIS], components=2)
    assert torch.allclose(pca.values, local.coactivation("mlp_out.1", [PROMPT, PARIS], components=2).values,
                          atol=1e-4)


@ON_ONE_WORKER
def test_a_failure_on_ndif_comes_back_as_one_line(on_ndif):
    with pytest.raises(RemoteError) as error:
        with on_ndif.trace(PROMPT):
            on_ndif["head.1.2"].save()  # hook points do not exist on NDIF
    text = one_line(error)
    assert "the trace failed on NDIF" in text and "head.1.2 is not available with remote=True" in text
    assert on_ndif._trace is None
    # NDIF's stock model has no carry (mechnb.core.residual): a write there would not be the
    # residual stream's.
    with pytest.raises(RemoteError) as error:
        with on_ndif.trace(PROMPT):
            on_ndif["resid_mid.1"] = 0
    assert "resid_mid.1 cannot be written with remote=True" in one_line(error) and on_ndif._trace is None


# -- remote=False touches no network ------------------------------------------------------


def test_local_models_touch_no_network(monkeypatch, weights):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = mechnb.load(weights, device="cpu")
    with model.trace(PROMPT):
        model["head.1.2"] = 0
        logits = model["logits"].save()
    assert logits.shape[:2] == (1, len(model.tokens(PROMPT)))
    model.cache(PARIS, ["resid_pre.*", "pattern.1"])
    model.top(PARIS)
    model.patch(PROMPT, "When Mary and John went to the store, Mary gave a drink to", "resid_pre.*",
                answer=" Mary", wrong=" John", progress=False)
    model.generate(PARIS, max_new_tokens=2)
    assert not model.remote and attempts == []
