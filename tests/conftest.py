"""Fixtures: tiny random models of every supported architecture, and the embedded model.

Tiny models (2-3 layers, d_model 32-64) build in milliseconds and use the embedded
SmolLM2 tokenizer, so their prompts tokenize like the real model's. The embedded
model itself (`real`) is loaded once per session from the safetensors cache (the
first run on a machine converts the GGUF, about 30 s).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os

# `make test` runs four pytest-xdist workers on two cores (while one waits on a kernel
# starting, a page loading or pip writing files, the others compute). Each worker, and every
# process it starts (notebook kernels, subprocesses), computes on one thread: processes of
# two OpenMP threads each on two cores wait on each other's descheduled threads (a tutorial
# took minutes instead of seconds), and the tests' tensors are small.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

import pytest  # noqa: E402
import torch  # noqa: E402
from xdist.scheduler import LoadGroupScheduling  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case torch was imported before this file

# A test process skips Python's last garbage collections when it exits: over a session's
# models and fixtures they took 3-10 s of each worker, at the end of the run, which waits
# for its workers to exit. Objects freed by reference counting are still finalized.
atexit.register(gc.freeze)

PROMPT = "When Mary and John went to the store, John gave a drink to"
PARIS = "The Eiffel Tower is located in the city of"

# name -> (config class path, config kwargs)
TINY_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=128)),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, use_parallel_residual=True)),
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=3, num_attention_heads=4,
                                                  use_parallel_residual=False)),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    sliding_window=4, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0)),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, sliding_window=4)),
}
ARCH_NAMES = list(TINY_CONFIGS)


@pytest.fixture(scope="session")
def embedded_dir():
    """The converted embedded model directory (converting it on first use)."""
    from mechnb.core import embedded

    return embedded.converted()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir, local_files_only=True)


def build_hf(name: str, tokenizer, seed: int = 0):
    """A tiny randomly initialised transformers model of architecture `name`."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return hf.eval()


@pytest.fixture(scope="session")
def tiny_factory(tokenizer):
    """`tiny_factory(name)` -> a fresh mechnb Model of a tiny random `name` model."""
    from mechnb.model import Model

    def make(name: str, seed: int = 0):
        return Model(build_hf(name, tokenizer, seed), tokenizer, name=f"tiny-{name}")

    return make


@pytest.fixture(scope="session", params=ARCH_NAMES)
def tiny(request, tiny_factory):
    """One tiny Model per architecture (shared within the session)."""
    return tiny_factory(request.param)


@pytest.fixture(scope="session")
def real():
    """The embedded SmolLM2-135M-Instruct, loaded once."""
    import mechnb

    return mechnb.load()


def hooks_left(model) -> int:
    """Forward hooks and pre-hooks on the model's modules, besides the ones mechnb keeps for
    good (`mechnb.core.residual`, which carries writes of resid_mid past the MLP)."""
    from mechnb.core import residual

    kept = (residual._before, residual._add)
    return sum(hook not in kept for m in model.hf.modules()
               for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()])


def clean_logits(model, prompt=PROMPT):
    """Logits of a plain forward of the underlying HF model, no nnsight involved."""
    batch = model.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model.hf(**batch).logits


@pytest.fixture(scope="session")
def saved(tmp_path_factory, tokenizer):
    """A directory holding a tiny random Llama and its tokenizer, as `save_pretrained` writes them."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_hf("llama", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shell():
    """A real IPython shell with the extension loaded (magics run through it)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext mechnb", store_history=False)
    yield shell
    shell.run_cell("%unload_ext mechnb", store_history=False)


@pytest.fixture(scope="session")
def vit_cache():
    """The mechnb cache, where `make test`'s set-up trained the tiny ViT (as it converted the
    embedded model): tests load it rather than train it again while other tests run."""
    from mechnb.core.embedded import cache_root

    return cache_root()


def with_cache(directory, fn):
    """`fn()` with MECHNB_CACHE set to `directory`."""
    before = os.environ.get("MECHNB_CACHE")
    os.environ["MECHNB_CACHE"] = str(directory)
    try:
        return fn()
    finally:
        if before is None:
            os.environ.pop("MECHNB_CACHE")
        else:
            os.environ["MECHNB_CACHE"] = before


@pytest.fixture(scope="session")
def vit(vit_cache):
    """The embedded tiny digits ViT from the mechnb cache (trained there first if absent; tests
    using it share the xdist group "vision", so one worker would train it)."""
    import mechnb

    return with_cache(vit_cache, lambda: mechnb.vision.tiny_vit())


def assert_one_line_errors(model, cases) -> None:
    """Each `(error class, words, call)` raises that error in one line holding the words, and
    leaves `model` unmodified."""
    for error, words, call in cases:
        with pytest.raises(error) as raised:
            call()
        message = str(raised.value)
        assert words in message and "\n" not in message, message
        assert model.unmodified


@contextlib.contextmanager
def json_server(reply):
    """A local HTTP server on 127.0.0.1 answering every request with `reply(body) -> (status, dict)`
    (`body` is the request's JSON, or None); yields its base URL."""
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            status, payload = reply(json.loads(self.rfile.read(length)) if length else None)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# The longest tests and about the CPU seconds each takes alone (tutorials: their kernels' cells;
# the Binder test: pip, postBuild and a cold first prompt). Under `make test` they start first,
# longest first, one per worker, and a worker running one takes no other test until it ends
# (`pytest_xdist_make_scheduler` below); the others go to whichever worker is free. So the
# run ends on short tests, on every worker at about the same time. Dealing them to fixed
# groups by expected time did not: their times in a run vary with what runs beside them (06
# took 120 s in one run and 218 s in the next), and a group waited behind another on one
# worker, the last 45 s of a run on one core.
LONGEST = {
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[10": 135,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[08": 130,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[07": 126,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[09": 110,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[05": 98,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[06": 95,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[04": 77,
    "test_binder.py::test_postbuild_runs_in_a_fresh_venv": 65,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[02": 27,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[11": 26,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[03": 25,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[01": 22,
    "test_notebooks.py::test_views_and_widgets_render_in_notebook_7": 15,
    "test_notebooks.py::test_tutorial_runs_in_jupyterlab[00": 10,
}
LONG_GROUP = "longest-"


def expected_seconds(item) -> float:
    name = item.nodeid.split("/")[-1]
    return max((s for prefix, s in LONGEST.items() if name.startswith(prefix)), default=0)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Longest first, each in a group of its own with one short test (what the scheduler below
    recognises); the rest in file order."""
    items.sort(key=lambda item: -expected_seconds(item))  # stable: ties keep file order
    longest = [item for item in items if expected_seconds(item)]
    # Each goes with one short test behind it: a pytest-xdist worker starts a test only once
    # it holds the next (or is told to stop), and a worker running one is sent nothing else.
    short = [item for item in items if not expected_seconds(item) and not item.get_closest_marker("xdist_group")]
    for rank, group in enumerate(zip(longest, short)):
        for item in group:
            item.add_marker(pytest.mark.xdist_group(f"{LONG_GROUP}{rank}"))


class LongestFirst(LoadGroupScheduling):
    """`--dist loadgroup`, except that a worker running one of the longest tests is sent no
    other test until it ends. pytest-xdist sends a worker more work whenever two or fewer of
    its tests are left to run, so a worker starting a tutorial also got the next tutorial in
    line, which waited there for minutes while other workers were free."""

    def _reschedule(self, node):
        assigned = self.assigned_work.get(node, {})
        long_pending = any(scope.startswith(LONG_GROUP) and not all(done.values()) for scope, done in assigned.items())
        # With nothing after it, a long test would not start: then the worker gets more.
        if long_pending and self._pending_of(assigned) >= 2:
            return
        super()._reschedule(node)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    return LongestFirst(config, log) if config.getvalue("dist") == "loadgroup" else None
