"""The test suite's own scheduling: `make test` runs the longest tests first, one per worker at a time (tests/conftest.py)."""

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


def _simulated_run(scheduler_class):
    """Two workers, three of the longest tests (a group each, as conftest marks them) and three
    others: what each worker is sent when scheduling starts, and after its first test ends."""
    from types import SimpleNamespace

    class Worker:
        def __init__(self, name):
            self.gateway, self.shutting_down, self.sent = SimpleNamespace(id=name), False, []

        def send_runtest_some(self, indexes):
            self.sent.extend(indexes)

        def shutdown(self):
            self.shutting_down = True

    config = SimpleNamespace(getvalue={"tx": ["2*popen"], "dist": "loadgroup"}.get,
                             option=SimpleNamespace(loadscopereorder=True))
    collection = [f"t.py::long{i}@longest-{i}" for i in range(3)] + [f"t.py::short{i}" for i in range(3)]
    scheduler = scheduler_class(config)
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    at_start = [[collection[i] for i in worker.sent] for worker in workers]
    scheduler.mark_test_complete(workers[1], workers[1].sent[0])
    return at_start, [collection[i] for i in workers[1].sent]


def test_a_worker_running_one_of_the_longest_tests_is_sent_nothing_else():
    from conftest import LongestFirst
    from xdist.scheduler import LoadGroupScheduling

    at_start, second = _simulated_run(LongestFirst)
    assert at_start == [["t.py::long0@longest-0"], ["t.py::long1@longest-1"]]
    assert second == ["t.py::long1@longest-1", "t.py::long2@longest-2"]  # the next long one, when free
    # pytest-xdist's own loadgroup queues the third long test behind the first at once
    plain, _ = _simulated_run(LoadGroupScheduling)
    assert plain[0] == ["t.py::long0@longest-0", "t.py::long2@longest-2"]
