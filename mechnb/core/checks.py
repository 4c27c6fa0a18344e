"""Small predicates for checking arguments, shared by every method that validates input.

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    >>> as_list("a"), as_list(("a", "b")), as_list({"a": 1})
    (['a'], ['a', 'b'], None)
"""

from __future__ import annotations


def is_int(value) -> bool:
    """An int that is not a bool (`True` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_list(value) -> list | None:
    """A string as `[value]`, any ordered collection (list, tuple, Series) as a list, else None.

    A dict or a set iterates over its keys in no useful order, so it is never a list of prompts.
    """
    if isinstance(value, str):
        return [value]
    if hasattr(value, "__iter__") and not isinstance(value, (dict, set, frozenset, bytes)):
        return list(value)
    return None
