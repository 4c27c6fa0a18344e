"""The shared argument predicates."""

import pandas as pd

from mechnb.core.checks import as_list, is_int


def test_is_int_refuses_bools_and_floats():
    assert is_int(3) and is_int(-1) and is_int(0)
    assert not is_int(True) and not is_int(3.0) and not is_int("3") and not is_int(None)


def test_as_list_takes_strings_and_ordered_collections_only():
    assert as_list("a") == ["a"] and as_list(("a", "b")) == ["a", "b"]
    assert as_list(pd.Series(["x", "y"])) == ["x", "y"] and as_list([]) == []
    assert as_list({"a": 1}) is None and as_list({"a"}) is None and as_list(b"ab") is None
    assert as_list(5) is None and as_list(None) is None
