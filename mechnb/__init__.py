"""mechnb: mechanistic interpretability in the notebook.

    %load_ext mechnb
    %mechnb load                     # the embedded SmolLM2-135M-Instruct, offline
    %mechnb top "The Eiffel Tower is located in the city of"

or from Python:

    >>> import mechnb
    >>> model = mechnb.load()
    >>> model.top("The Eiffel Tower is located in the city of").token[0]
    ' Paris'

The public names: `load` and `Model` (`mechnb.model`), `launch` (a job over several
processes, `mechnb.notebook.launch`), `Site` and `parse_site`, `Batch`,
`Result`, `Circuit`, every error class (`mechnb.SiteError`, `mechnb.PatchError`, ...),
and the subpackages `mechnb.sae`, `mechnb.circuits`, `mechnb.transcoders`, `mechnb.graphs`,
`mechnb.vision`, `mechnb.causal`, `mechnb.datasets` and `mechnb.agent` (the MCP server's tools). The layout
of the package is in `docs/architecture.md`.

`import mechnb` stays fast: torch, transformers and nnsight load on first use, when one
of the names above is first touched.
"""

from .core.errors import *  # noqa: F401,F403 - every error class, light to import
from .core.errors import __all__ as _errors
from .core.loading import API_MODULE as _API_MODULE

_API_MODULE[:] = ["mechnb.model"]  # models built by methods (mechnb.vision.tiny_vit) are mechnb.Models

__version__ = "0.1.0"

# Name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "load": "mechnb.model", "Model": "mechnb.model", "launch": "mechnb.notebook.launch", "Site": "mechnb.core.sites",
    "parse_site": "mechnb.core.sites", "Batch": "mechnb.core.batch", "Result": "mechnb.display.results",
    "Circuit": "mechnb.circuits",
}
_SUBPACKAGES = ("sae", "circuits", "transcoders", "graphs", "vision", "causal", "datasets", "agent")

__all__ = [*_LAZY, *_SUBPACKAGES, *_errors, "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, "parse" if name == "parse_site" else name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mechnb' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(shell):
    """`%load_ext mechnb`: register the magics on this shell."""
    from .notebook.magics import load_extension

    load_extension(shell)


def unload_ipython_extension(shell):
    """`%unload_ext mechnb`: remove the magics and this shell's session."""
    from .notebook.magics import unload_extension

    unload_extension(shell)
