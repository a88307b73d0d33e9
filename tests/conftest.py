"""Settings for the whole suite: the tests write nothing into the checkout (pytest's tmp_path is the
place for files).  Hypothesis would keep its example database and constants cache in ./.hypothesis:
here they live in a temporary folder removed at the end of the session, and no database is kept."""
import shutil
import tempfile

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
