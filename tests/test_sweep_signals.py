"""Stopping a sweep: SIGINT (Ctrl-C) or SIGTERM ends the run in flight with everything it started (DataLoader
workers included), records it as interrupted, exits with 128 + the signal number, and the next sweep runs
it again without touching the runs that had finished."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from segresmamba.bench import sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every live process (zombies are dead)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # not a process, or it just ended
            continue
        if state != "Z":
            out[int(entry.name)] = (int(ppid), int(group), state)
    return out


def _descendants(pid: int) -> set[int]:
    procs = _processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tmp_path_factory.mktemp("brats") / "phantom"


def _sweep_file(tmp_path: Path, phantom: Path) -> Path:
    """Two tiny runs (unet under both recipes); one DataLoader worker, so a run has a process of its own."""
    spec = {
        "name": "signals", "dataset": "brats", "config": ["configs/trainer/cpu.yaml", "configs/data/brats_phantom.yaml"],
        "phantom": {"kind": "brats", "out": str(phantom), "cases": 5, "size": 32, "seed": 0},
        "models": "unet", "folds": [0], "recipes": ["paper", "nnunet"],
        "out": str(tmp_path / "results"), "runs_dir": str(tmp_path / "runs"),
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0},
        "data": {"init_args": {"patch_size": 32, "batch_size": 1, "cache_rate": 0.0, "num_workers": 1}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture()
def start_sweep(tmp_path):
    """Start the sweep as a terminal does: a process group of its own (the one Ctrl-C signals). Whatever a
    failed test left running is killed at teardown."""
    started = []

    def start(path: Path) -> subprocess.Popen:
        with open(tmp_path / "sweep.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "segresmamba.bench.sweep", str(path)], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            for pid in {proc.pid, *_descendants(proc.pid)}:
                os.kill(pid, signal.SIGKILL)
            proc.wait()


def _stop(proc: subprocess.Popen, signum: int, to_group: bool) -> tuple[int, set[int]]:
    """Send ``signum`` once the run in flight has its DataLoader worker; (exit status, the processes there were)."""
    started = _wait_for(lambda: found if len(found := _descendants(proc.pid)) >= 2 else None, 90, "a run with its DataLoader worker")
    groups = {_processes()[pid][1] for pid in started if pid in _processes()}
    assert proc.pid not in groups  # each run has a process group of its own
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    status = proc.wait(timeout=60)
    survivors = {pid for pid, (_, group, _) in _processes().items() if pid in started or group in groups}
    return status, survivors


def _status(tmp_path: Path, recipe: str) -> str | None:
    record = tmp_path / "results" / recipe / "unet" / "fold0" / "metrics.json"
    return json.loads(record.read_text())["status"] if record.exists() else None


def test_ctrl_c_stops_the_run_and_its_workers_and_records_it_interrupted(phantom, tmp_path, start_sweep, monkeypatch):
    path = _sweep_file(tmp_path, phantom)
    proc = start_sweep(path)
    status, survivors = _stop(proc, signal.SIGINT, to_group=True)
    log = (tmp_path / "sweep.log").read_text()
    assert status == 130, log[-3000:]
    assert not survivors, f"processes outlived the sweep: {survivors}"
    assert _status(tmp_path, "paper") == "interrupted" and _status(tmp_path, "nnunet") is None  # the next run never started
    assert not (tmp_path / "runs" / "signals" / "nnunet").exists()
    assert "1 run(s) in flight recorded as interrupted, 1 not started" in log

    # the next sweep runs both again, the interrupted one included, without --retry-failed
    ran = []
    monkeypatch.setattr(sweep, "execute_run", lambda s, run, *args, **kwargs: ran.append(run.recipe) or {"status": "ok"})
    sweep.run_sweep(path)
    assert sorted(ran) == ["nnunet", "paper"]


@pytest.mark.slow
def test_sigterm_then_rerun_finishes_every_run_and_keeps_the_finished_one(phantom, tmp_path, capsys, start_sweep):
    path = _sweep_file(tmp_path, phantom)
    proc = start_sweep(path)
    finished = tmp_path / "results" / "paper" / "unet" / "fold0" / "metrics.json"
    _wait_for(finished.exists, 120, "the first run to finish")
    kept = finished.read_text()
    status, survivors = _stop(proc, signal.SIGTERM, to_group=False)  # `kill -TERM <sweep>`: the sweep alone
    assert status == 143, (tmp_path / "sweep.log").read_text()[-3000:]
    assert not survivors, f"processes outlived the sweep: {survivors}"
    assert (_status(tmp_path, "paper"), _status(tmp_path, "nnunet")) == ("ok", "interrupted")

    records = sweep.run_sweep(path)  # no --retry-failed: an interrupted run is run again all the same
    assert [(r["recipe"], r["status"]) for r in records] == [("nnunet", "ok")]
    assert finished.read_text() == kept  # the finished run is neither redone nor lost
    out = capsys.readouterr().out
    assert "skip unet [paper] fold 0: finished (ok)" in out and "run unet [nnunet] fold 0 again: it was interrupted" in out
    assert sweep.main([str(path)]) == 0
