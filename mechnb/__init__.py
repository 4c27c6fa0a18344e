"""mechnb: mechanistic interpretability in the notebook.

    %load_ext mechnb
    %mechnb load                     # the embedded SmolLM2-135M-Instruct, offline
    %mechnb top "The Eiffel Tower is located in the city of"

or from Python:

    >>> import mechnb
    >>> model = mechnb.load()
    >>> model.top("The Eiffel Tower is located in the city of").token[0]
    ' Paris'

`import mechnb` stays fast: torch, transformers and nnsight load on first use.
"""

from .errors import MagicError, MechnbError, ModelError, RemoteError, SiteError, TraceError
from .sites import Site, parse as parse_site

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Circuit", "Site", "parse_site", "MechnbError", "SiteError", "ModelError",
    "TraceError", "MagicError", "RemoteError", "load_ipython_extension", "unload_ipython_extension",
]


def load(name=None, device=None, dtype=None, device_map=None, remote=False, **hf_kwargs):
    """Load a model (default: the embedded SmolLM2-135M-Instruct); see `mechnb.loading.load`
    (`device_map="auto"` spreads it over every GPU, `remote=True` runs it on NDIF)."""
    from .loading import load as _load

    return _load(name, device=device, dtype=dtype, device_map=device_map, remote=remote, **hf_kwargs)


def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    if name == "Circuit":
        from .circuits import Circuit

        return Circuit
    raise AttributeError(f"module 'mechnb' has no attribute {name!r}")


def load_ipython_extension(shell):
    """`%load_ext mechnb`: register the magics on this shell."""
    from .magics import load_extension

    load_extension(shell)


def unload_ipython_extension(shell):
    """`%unload_ext mechnb`: remove the magics and this shell's session."""
    from .magics import unload_extension

    unload_extension(shell)
