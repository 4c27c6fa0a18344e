"""Errors mechnb raises: one class per kind, all subclasses of `MechnbError`.

Every message names the bad value, says what is valid, and what to do next, in one
line, because in a notebook the message is all the user sees: the magics print it
without a traceback (see `mechnb.magics`).
"""


class MechnbError(Exception):
    """Base of every error mechnb raises on purpose."""


class SiteError(MechnbError, ValueError):
    """A site string that does not parse, or names something this model lacks."""


class ModelError(MechnbError):
    """A model that cannot be found, loaded or wrapped, or no model loaded yet."""


class TraceError(MechnbError):
    """A trace that failed; the model is left exactly as before it."""


class MagicError(MechnbError, ValueError):
    """Arguments to a magic that do not parse."""


class MemoryBudgetError(MechnbError, MemoryError):
    """A sweep that ran out of memory even one item at a time (see `mechnb.memory`)."""


class RemoteError(MechnbError):
    """A remote (NDIF) run that cannot start or failed, or a method that needs local weights."""
