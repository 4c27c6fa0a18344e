"""circuit-tracer 0.5.0's own environment, and a call into bench/circuit_tracer_peer.py.

circuit-tracer is never a dependency of mechnb: it pins transformers<=4.57.3 (mechnb runs on 5.x)
and pulls in nnsight and transformer-lens. It lives in `bench/.venv-circuit-tracer`, made on first
use (about 3 minutes, once): torch 2.13.0 first, so pip takes the CPU build and later requirements
see torch as already satisfied, then circuit-tracer 0.5.0 with torch held at 2.13.0 and nnsight
at 0.6.3. circuit-tracer 0.5.0 (2026-03-29) asks only nnsight>=0.6.0, but nnsight 0.8 moved
`nnsight.intervention.tracing` (ModuleNotFoundError on backend="nnsight"); 0.6.3 was the newest
nnsight when circuit-tracer 0.5.0 was released. transformers resolves to 4.57.3 (its pin).

    from circuit_tracer_env import circuit_tracer_python, run_peer   # a script in bench/, like causal.py
    result = run_peer(model_folder, clt_dir, "The Eiffel Tower is located in the city of", out_dir)

`run_peer` writes OUT_DIR/IN.json, runs the peer (see its docstring for what is timed) and returns
OUT_DIR/result.json; the graph's tensors are in OUT_DIR/graph.safetensors.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PEER_VENV = ROOT / ".venv-circuit-tracer"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_SCRIPT = ROOT / "circuit_tracer_peer.py"
TORCH = "torch==2.13.0"
CIRCUIT_TRACER = "circuit-tracer==0.5.0"
NNSIGHT = "nnsight==0.6.3"

_CHECK = ("import torch, transformers, nnsight, circuit_tracer; "
          "from importlib.metadata import version; "
          "assert version('circuit-tracer') == '0.5.0', version('circuit-tracer'); "
          "assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; "
          "assert transformers.__version__.startswith('4.'), transformers.__version__; "
          "from circuit_tracer import ReplacementModel, attribute; "
          "from circuit_tracer.transcoder.cross_layer_transcoder import load_clt; "
          "from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel")


def circuit_tracer_python(quiet: bool = False) -> Path:
    """The peer venv's python, making `bench/.venv-circuit-tracer` first if its import check fails."""
    if PEER_PYTHON.exists() and subprocess.run([str(PEER_PYTHON), "-c", _CHECK],
                                               capture_output=True).returncode == 0:
        return PEER_PYTHON
    if not quiet:
        print("making bench/.venv-circuit-tracer (about 3 minutes, once)", flush=True)
    if not PEER_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH], check=True)  # first: the CPU build, before anything asks for torch
    subprocess.run(pip + [TORCH, CIRCUIT_TRACER, NNSIGHT], check=True)
    check = subprocess.run([str(PEER_PYTHON), "-c", _CHECK], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"bench/.venv-circuit-tracer failed its import check:\n{check.stderr}")
    return PEER_PYTHON


def run_peer(model_folder, clt_dir, prompt, out_dir, **options) -> dict:
    """Build circuit-tracer's attribution graph for `prompt` over the CLT in `clt_dir`.

    options (peer defaults in brackets): max_feature_nodes [4096], batch_size [256],
    max_n_logits [10], desired_logit_prob [0.95], threads [2], feature_input_hook
    ["mlp.hook_in": the MLP input after post_attention_layernorm], feature_output_hook
    ["mlp.hook_out": the MLP output], offload [None], update_interval [4]; plus timeout
    (seconds, for subprocess) and quiet (capture the peer's stdout/stderr; shown only if it fails).
    Returns result.json's content; OUT_DIR/graph.safetensors holds the graph's tensors.
    """
    timeout = options.pop("timeout", None)
    quiet = options.pop("quiet", False)
    python = circuit_tracer_python(quiet=quiet)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(Path(model_folder).resolve()), "clt": str(Path(clt_dir).resolve()),
            "prompt": prompt, **options}
    (out / "IN.json").write_text(json.dumps(spec, indent=1))
    done = subprocess.run([str(python), str(PEER_SCRIPT), str(out / "IN.json"), str(out)],
                          capture_output=quiet, text=True, timeout=timeout)
    if done.returncode != 0:
        detail = f"\n{done.stdout}\n{done.stderr}" if quiet else ""
        raise RuntimeError(f"circuit_tracer_peer.py exited {done.returncode}{detail}")
    return json.loads((out / "result.json").read_text())
