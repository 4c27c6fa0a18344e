"""The test suite's own scheduling: `make test` deals tests to four workers by group."""

import pytest


def test_the_longest_tests_and_the_simulated_ndif_keep_their_worker_groups(request):
    """Under `--dist loadgroup` pytest-xdist sends a group to one worker by adding `@group` to
    its tests' node ids. When that is lost (pytest 9.2, pytest-xdist#1386; or a marker added
    after xdist read them: conftest's hook runs first) the tests are dealt out one by one,
    silently: the longest tutorials may share a worker and the simulated NDIF server
    starts on each.
    """
    if not getattr(request.config.option, "loadgroup", False):  # set on pytest-xdist's workers
        pytest.skip("the groups exist only under make test (pytest-xdist, --dist loadgroup)")
    marked = [item for item in request.session.items if item.get_closest_marker("xdist_group")]
    if not marked:
        pytest.skip("no grouped test in this run")
    lost = [item.nodeid for item in marked if "@" not in item.nodeid.rsplit("]", 1)[-1]]
    assert not lost, f"pytest-xdist ignores the xdist_group of {len(lost)} tests, first {lost[0]}: use pytest<9.2"
