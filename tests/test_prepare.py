"""``python -m mpicdc.prepare`` and ``python -m mpicdc.bench prepare``: real subprocesses and real files."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpicdc import store
from mpicdc.store.prepare_cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env():
    """The environment of a subprocess: this checkout's mpicdc first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(*args, cwd=None, module="mpicdc.prepare", timeout=120):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """tiny over 3 data workers and one sum parity worker, prepared by the CLI into --out ROOT."""
    root = tmp_path_factory.mktemp("cli")
    done = run("tiny", "--workers", 3, "--code", "sum", "--seed", 2, "--out", root / "weights")
    assert done.returncode == 0, done.stderr
    out = root / "weights" / "tiny-w3-p1-sum"
    assert f"wrote {out}/" in done.stdout and f"python -m mpicdc.launch -np 5 tiny --weights {out}" in done.stdout
    assert done.stderr == ""        # not a terminal: no progress bar
    return out


def test_help_teaches():
    done = run("--help")
    assert done.returncode == 0
    for text in ("examples:", "--workers", "--parity", "groups:G", "--keep-on-master", "--layer-workers",
                 "--speeds", "--source", "--show", "--verify", "--dry-run", "-np 1+N+R", "mpicdc.launch -np 12", "exit status",
                 "default: sum", "inception_v3"):
        assert text in done.stdout, text


def test_prepare_writes_the_default_folder(shards):
    m = store.open_manifest(shards)
    assert (m.model.name, m.plan.tag, m.world_size, m.seed) == ("tiny", "w3-p1-sum", 5, 2)
    assert m.command.startswith("python -m mpicdc.prepare tiny --workers 3 --code sum")
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.h5"] + [f"rank-{r:03d}.h5" for r in range(5)]


def test_show_prints_the_plan_table(shards):
    done = run("--show", shards)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in ("layer", "shape", "split", "ranks", "code", "block rows", "MB/rank", "conv1", "8x27",
                 "1-3 | 4", "parity", "rank-004.h5", "seed 2", "mpicdc.launch -np 5",
                 "mpirun -hostfile HOSTFILE -np 5 python -m mpicdc.run tiny"):
        assert text in out, text
    assert out.count(" sum ") >= 7


def test_verify_ok_then_problems(shards, tmp_path):
    done = run("--verify", shards)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"OK: {shards}")
    device = tmp_path / "device"        # what one Pi holds: the manifest and its own shard
    device.mkdir()
    for name in ("manifest.h5", "rank-003.h5"):
        (device / name).write_bytes((shards / name).read_bytes())
    done = run("--verify", device, "--rank", 3)
    assert done.returncode == 0 and "OK: " in done.stdout and "rank-003.h5 verified" in done.stdout
    done = run("--verify", device, "--rank", 2)
    assert done.returncode == 1 and "rank-002.h5: shard file of rank 2 is missing" in done.stdout
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in shards.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    data = bytearray((broken / "rank-002.h5").read_bytes())
    data[len(data) // 2] ^= 1
    (broken / "rank-002.h5").write_bytes(bytes(data))
    done = run("--verify", broken)
    assert done.returncode == 1
    assert "problem: " in done.stdout and "rank-002.h5" in done.stdout and "FAILED" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_dry_run_writes_nothing(tmp_path):
    done = run("alexnet", "--workers", 4, "--code", "groups:2", "--keep-on-master", "fc8",
               "--layer-workers", "fc6=1-3", "--speeds", "1,1,1,2", "--dry-run", "--dir", tmp_path / "x")
    assert done.returncode == 0, done.stderr
    assert "nothing written" in done.stdout and not (tmp_path / "x").exists()
    fc6 = [line for line in done.stdout.splitlines() if line.startswith("fc6")][0]
    assert "3+2" in fc6 and "1-3 | 5-6" in fc6
    assert "master" in [line for line in done.stdout.splitlines() if line.startswith("fc8")][0]


@pytest.mark.parametrize("args, message", [
    (["resnet9000", "--workers", "2"], "unknown model 'resnet9000'; known models: actionrec, alexnet, alexnet_2tower, c3d"),
    (["tiny", "--workers", "2", "--code", "fountain"], "unknown code spec 'fountain'; expected none | sum"),
    (["tiny", "--workers", "-1"], "--workers must be 0 (one device doing everything) or more"),
    (["tiny"], "--workers N is required"),
    (["tiny", "--workers", "2", "--code", "mds"], "needs --parity R"),
    (["tiny", "--workers", "2", "--code", "sum", "--parity", "2"], "uses 1 parity worker(s)"),
    (["tiny", "--workers", "2", "--keep-on-master", "relu7"], "'relu7' is not a linear layer of tiny"),
    (["tiny", "--workers", "2", "--layer-workers", "fc1"], "expected LAYER=RANKS"),
    (["tiny", "--workers", "2", "--layer-workers", "fc1=1,x"], "'x' is not a rank"),
    (["tiny", "--workers", "2", "--layer-workers", "fc1=1,5"], "not data workers"),
    (["tiny", "--workers", "2", "--speeds", "1,a"], "expected numbers"),
    (["tiny", "--workers", "2", "--speeds", "1,2,3"], "speeds has 3 entries"),
    (["tiny", "--workers", "2", "--source", "no-such-file.onnx"], "no such file"),
    (["tiny", "--show", "somewhere"], "take a folder and no MODEL"),
    (["--rank", "1"], "--rank K goes with --verify DIR"),
    ([], "MODEL is required"),
])
def test_usage_errors_exit_2_without_traceback(capsys, tmp_path, args, message):
    assert main(args + ["--dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("usage: python -m mpicdc.prepare")
    assert not (tmp_path / "w").exists()


def test_error_exit_codes_in_a_subprocess(tmp_path):
    done = run("lenet5", "--workers", 2)
    assert done.returncode == 2 and "known models:" in done.stderr and "Traceback" not in done.stderr
    done = run("tiny", "--workers", 2, "--bogus")
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr
    done = run("--show", tmp_path / "missing")
    assert done.returncode == 1 and "no such weight directory" in done.stderr and "Traceback" not in done.stderr
    done = run("--verify", tmp_path / "missing")
    assert done.returncode == 1 and "problem:" in done.stdout


def test_source_file_through_the_importers(tmp_path):
    import numpy as np

    from mpicdc.core.models import get_model
    from mpicdc.core.random_weights import init_weights
    from mpicdc.store.importers import save_npz

    model = get_model("lenet")
    weights = init_weights(model, 5)
    save_npz(tmp_path / "lenet.npz", model, weights)
    done = run("lenet", "--workers", 2, "--code", "sum", "--source", "lenet.npz", "--dir", "shards", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    m = store.open_manifest(tmp_path / "shards")
    assert (m.source, m.seed) == ("lenet.npz", None) and store.verify(m.directory) == []
    lp = m.plan.for_layer("fc1")
    (start, stop), rank = lp.rows[1], lp.ranks[1]
    W, b = store.load_rank(m.directory, rank, m, pad=False)["fc1"]
    np.testing.assert_array_equal(W, weights["fc1"][0][start:stop])
    np.testing.assert_array_equal(b, weights["fc1"][1][start:stop])
    done = run("tiny", "--workers", 2, "--source", "lenet.npz", "--dir", "other", cwd=tmp_path)
    assert done.returncode == 1 and "lenet.npz" in done.stderr and "Traceback" not in done.stderr


def test_bench_reports_peak_memory_ratio():
    done = run("prepare", "--model", "alexnet", "--workers", 4, "--code", "sum", "--check", module="mpicdc.bench",
               timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "largest layer        fc6 4096x9216" in done.stdout
    assert "x largest layer" in done.stdout and "within the 1.5 x budget" in done.stdout


# ---------------------------------------------------------------- interrupted, concurrent and full-disk prepares

def start(*args):
    """``python -m mpicdc.prepare ARGS`` in the background (the caller bounds it with ``finish``)."""
    return subprocess.Popen([sys.executable, "-m", "mpicdc.prepare", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def wait_for(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _partial_bytes(folder):
    return sum(f.stat().st_size for p in folder.glob(".partial-*") for f in p.rglob("*") if f.is_file())


def _lock_pid(folder):
    lock = folder.parent / f".{folder.name}.prepare-lock"
    text = lock.read_text() if lock.exists() else ""
    return int(text.split()[1]) if text.startswith("pid ") and len(text.split()) > 1 else None


def test_killed_prepare_leaves_a_partial_that_the_next_run_removes(tmp_path):
    out = tmp_path / "w"
    proc = start("alexnet", "--workers", 2, "--code", "sum", "--dir", out)
    try:
        wait_for(lambda: _partial_bytes(out) > (2 << 20) or proc.poll() is not None, "a partial folder being written")
        assert proc.poll() is None, "prepare finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        finish(proc)
    assert list(out.glob(".partial-*")) and not (out / "manifest.h5").exists()
    done = run("tiny", "--workers", 2, "--code", "sum", "--dir", out)      # the dead writer's lock is gone
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"{out}: removed 1 partial folder(s) (") and done.stderr.count("\n") == 1
    assert not list(out.glob(".partial-*")) and store.verify(out) == []


def test_concurrent_prepares_of_one_folder(tmp_path):
    out = tmp_path / "w"
    first = start("alexnet", "--workers", 2, "--code", "sum", "--dir", out)
    waiting = None
    try:
        wait_for(lambda: _lock_pid(out) == first.pid or first.poll() is not None, "the first prepare's lock")
        first.send_signal(signal.SIGSTOP)      # holds the lock for as long as the test needs
        done = run("tiny", "--workers", 2, "--code", "sum", "--dir", out)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert f"another prepare (pid {first.pid}: python -m mpicdc.prepare alexnet --workers 2" in done.stderr
        assert "--wait SECONDS" in done.stderr and f"kill {first.pid}" in done.stderr
        waiting = start("tiny", "--workers", 2, "--code", "sum", "--dir", out, "--wait", 120)
        wait_for(lambda: waiting.poll() is not None or _stderr_has(waiting, "waiting up to"), "the waiting message",
                 timeout=30)
        first.send_signal(signal.SIGCONT)
        rc, _, err = finish(first)
        assert rc == 0, err
        rc, _, err = finish(waiting)
        err = _SEEN.pop(waiting.pid, "") + err
        assert rc == 0 and f"another prepare (pid {first.pid}" in err and "waiting up to 1" in err, err
    finally:
        for proc in (first, waiting):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                finish(proc)
    m = store.open_manifest(out)
    assert m.model.name == "tiny" and store.verify(out) == [] and not list(out.glob(".partial-*"))


_SEEN = {}      # pid -> what _stderr_has read from its stderr


def _stderr_has(proc, text):
    """Read what ``proc`` wrote to stderr so far (non-blocking) and look for ``text``."""
    import fcntl
    fd = proc.stderr.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        chunk = os.read(fd, 65536).decode(errors="replace")
    except BlockingIOError:
        chunk = ""
    _SEEN[proc.pid] = _SEEN.get(proc.pid, "") + chunk
    return text in _SEEN[proc.pid]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real full disk (needs root and mount; skipped otherwise, with the reason)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30, check=False)


def test_full_disk_is_refused_early_and_reported_in_one_line(small_disk):
    out = small_disk / "w"
    done = run("tiny", "--workers", 2, "--code", "sum", "--dir", out)
    assert done.returncode == 0, done.stderr
    before = store.open_manifest(out).preparation
    done = run("alexnet", "--workers", 2, "--code", "sum", "--dir", out)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert re.search(rf"{re.escape(str(out))}: not enough free space: the shards need about 3\d\d\.\d MiB, the disk "
                     r"has \d\.\d MiB free; free some space or prepare into another folder", done.stderr), done.stderr
    # past the estimate: the real ENOSPC from HDF5, in a subprocess in case h5py crashes on it
    code = ("import sys; from mpicdc import store; from mpicdc.core.models import get_model; "
            "from mpicdc.core.plan import make_plan\n"
            "m = get_model('alexnet')\n"
            "try:\n"
            f"    store.prepare(m, make_plan(m, 2, None, 'sum'), {str(out)!r}, check_space=False)\n"
            "except store.ShardError as exc:\n"
            "    print(exc); sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stdout.count("\n") == 1 and done.stdout.startswith(f"{out}: no space left on device while writing "
                                                                   "the shards ("), done.stdout
    assert re.search(r"\(\d\.\d MiB free, about 3\d\d\.\d MiB needed\)", done.stdout) and "the previous files" in done.stdout and done.stderr == ""
    assert not list(out.glob(".partial-*"))
    assert store.open_manifest(out).preparation == before and store.verify(out) == []


def test_absurd_manifest_is_refused_within_bounded_memory(shards, tmp_path):
    import json
    import resource

    import h5py

    folder = tmp_path / "edited"
    folder.mkdir()
    for path in shards.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    with h5py.File(folder / "manifest.h5", "r+") as f:
        d = json.loads(f.attrs["model_json"])
        next(x for x in d["layers"] if x["op"] == "dense")["attrs"]["out"] = 10**9
        f.attrs["model_json"] = json.dumps(d)

    def limit():        # 2 GiB of address space: far below what the edited model would allocate
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    for option in ("--show", "--verify"):
        done = subprocess.run([sys.executable, "-m", "mpicdc.prepare", option, str(folder)], env=_env(),
                              capture_output=True, text=True, timeout=120, preexec_fn=limit, check=False)
        text = done.stdout + done.stderr
        assert done.returncode == 1 and "of the model has a 1,000,000,000x" in text, text
        assert "MemoryError" not in text and "Traceback" not in text
