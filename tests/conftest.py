"""Settings for the whole suite: the tests write nothing into the checkout (pytest's tmp_path is the
place for files).  Hypothesis would keep its example database and constants cache in ./.hypothesis:
here they live in a temporary folder removed at the end of the session, and no database is kept."""
import shutil
import tempfile

import pytest

_HYPOTHESIS_HOME = None


def pytest_configure(config):
    global _HYPOTHESIS_HOME
    try:
        from hypothesis import settings
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # pragma: no cover - hypothesis comes with mpicdc[test]
        return
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="mpicdc-hypothesis-")
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)
    settings.register_profile("mpicdc", database=None)
    settings.load_profile("mpicdc")


def pytest_unconfigure(config):
    if _HYPOTHESIS_HOME:
        shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


@pytest.fixture
def cluster():
    """``make(shard folder, network rule=None, **coordinator options)``: a master and worker threads over
    the in-process fake network (test_protocol.Cluster), used by the protocol, wire and slice tests."""
    from test_protocol import Cluster

    made = []

    def make(directory, rule=None, **options):
        made.append(Cluster(directory, rule, **options))
        return made[-1]

    yield make
    for c in made:  # a test that failed half-way must not leave worker threads spinning
        for stop in c.stops.values():
            stop.set()
