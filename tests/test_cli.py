"""The CLI as a user runs it: fit a few steps, resume from a checkpoint, test, in a temporary folder."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = [
    "--data.volume_size", "48", "--data.patch_size", "48",
    "--data.num_train", "2", "--data.num_val", "1", "--data.num_test", "1",
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "segresmamba", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    run_cli(
        "fit", "-c", str(ROOT / "configs/trainer/cpu.yaml"), "-c", str(ROOT / "configs/model/segresmamba.yaml"),
        "--model.net_kwargs.feature_sizes", "[8, 16, 32, 64]", "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false", *DATA, cwd=cwd,
    )
    return cwd


def test_fit_writes_run_record(fitted):
    run = fitted / "runs/default/version_0"
    record = json.loads((run / "metrics.json").read_text())
    assert record["model"] == "segresmamba"
    assert record["data"]["provenance"] == "synthetic"
    assert record["provenance"]["precision"] == "32-true"
    assert record["fit"]["epochs"] == 2 and record["fit"]["global_steps"] == 4
    assert len(record["fit"]["val_history"]) == 2
    best = record["fit"]["best"]
    assert 0.0 <= best["val/dice_mean"] <= 1.0 and {"val/dice_TC", "val/dice_WT", "val/dice_ET"} <= set(best)
    assert (run / "checkpoints/last.ckpt").exists()
    assert 0.0 <= record["fit"]["untrained"]["val/dice_mean"] <= 1.0  # the sanity check scores the untrained net
    assert (run / "config.yaml").exists()


def test_resume_then_test(fitted):
    ckpt = fitted / "runs/default/version_0/checkpoints/last.ckpt"
    common = ["-c", str(ROOT / "configs/trainer/cpu.yaml"), "-c", str(ROOT / "configs/model/segresmamba.yaml"),
              "--model.net_kwargs.feature_sizes", "[8, 16, 32, 64]", "--trainer.enable_progress_bar", "false", *DATA]
    run_cli("fit", *common, "--trainer.max_epochs", "3", "--ckpt_path", str(ckpt), cwd=fitted)
    resumed = json.loads((fitted / "runs/default/version_1/metrics.json").read_text())
    assert resumed["fit"]["epochs"] == 3 and resumed["fit"]["global_steps"] == 6  # continued, not restarted
    run_cli("test", *common, "--ckpt_path", str(ckpt), cwd=fitted)
    tested = json.loads((fitted / "runs/default/version_2/metrics.json").read_text())
    assert set(tested["test"]) >= {"test/dice_mean", "test/dice_TC", "test/dice_WT", "test/dice_ET", "ckpt_path"}
    assert 0.0 <= tested["test"]["test/dice_mean"] <= 1.0
    assert "test/hd95_mean" in tested["test"] and tested["test"]["eval_space"] == "original"
    assert tested["test"]["num_cases"] == 1
    with (fitted / "runs/default/version_2/test_cases.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case_id"], r["class"]) for r in rows] == [("test000", "TC"), ("test000", "WT"), ("test000", "ET")]
    assert set(rows[0]) == {"case_id", "class", "dice", "hd95_mm", "eval_space", "spacing_mm"}


def test_unknown_model_fails_before_training(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "segresmamba", "fit", "--model.net", "segresmambo", *DATA],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "unknown model 'segresmambo'" in out.stderr
    assert not (tmp_path / "runs/default/version_0/checkpoints").exists()


def test_doctor():
    out = subprocess.run([sys.executable, "-m", "segresmamba", "doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "scan backends:" in out.stdout and "torch" in out.stdout and "segresmamba_notom" in out.stdout
    assert "CPU bf16 conv3d weight gradient: relative error" in out.stdout
    if importlib.util.find_spec("triton"):
        assert "the Triton scan's backward runs its right-to-left recurrence as" in out.stdout


@pytest.mark.parametrize(
    "version, on_gpu, advised",
    [("3.6.0", True, True), ("3.9.0", True, False), ("3.10.1", True, False), ("3.6.0", False, False), (None, True, False),
     ("3.6.0+git1234", True, True), ("nightly", True, False)],
)
def test_doctor_advises_a_newer_triton_only_on_a_gpu_with_an_older_one(version, on_gpu, advised):
    from segresmamba.cli import triton_advice

    advice = triton_advice(version, on_gpu)
    assert (advice is not None) == advised
    if advised:
        assert version in advice and "3.9" in advice and "results/perf/triton_ab.md" in advice


def test_fit_on_the_real_mni152_tissue_set(tmp_path):
    run_cli(
        "fit", "-c", str(ROOT / "configs/trainer/cpu.yaml"), "-c", str(ROOT / "configs/model/segresmamba.yaml"),
        "-c", str(ROOT / "configs/data/mni152_tissue.yaml"),
        "--model.net_kwargs.feature_sizes", "[8, 16, 32, 64]", "--data.patch_size", "48", "--data.train_items", "2",
        "--data.num_samples", "1", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path,
    )
    record = json.loads((tmp_path / "runs/default/version_0/metrics.json").read_text())
    assert record["data"]["dataset"] == "mni152_tissue" and record["data"]["provenance"] == "real"
    assert record["fit"]["global_steps"] == 2
    assert {"val/dice_CSF_other", "val/dice_GM", "val/dice_WM", "val/dice_mean"} <= set(record["fit"]["best"])


def test_distributed_test_matches_one_process(fitted):
    """DDP (gloo, 2 CPU processes) scores the same cases as one process: per-case rows are gathered, not averaged
    per rank. Three test cases: the distributed sampler repeats one to even out the ranks, and it counts once."""
    ckpt = fitted / "runs/default/version_0/checkpoints/last.ckpt"
    common = ["-c", str(ROOT / "configs/trainer/cpu.yaml"), "-c", str(ROOT / "configs/model/segresmamba.yaml"),
              "--model.net_kwargs.feature_sizes", "[8, 16, 32, 64]", "--trainer.enable_progress_bar", "false",
              *DATA, "--data.num_test", "3", "--ckpt_path", str(ckpt)]
    run_cli("test", *common, "--run_record", str(fitted / "one.json"), cwd=fitted)
    run_cli("test", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--run_record", str(fitted / "two.json"), cwd=fitted)
    one = json.loads((fitted / "one.json").read_text())["test"]
    two = json.loads((fitted / "two.json").read_text())["test"]
    for key in ("test/dice_mean", "test/dice_TC", "test/dice_WT", "test/dice_ET", "test/hd95_mean"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert one["num_cases"] == two["num_cases"] == 3
    rows = [list(csv.DictReader((fitted / f"{name}_test_cases.csv").open())) for name in ("one", "two")]
    assert [(r["case_id"], r["class"]) for r in rows[1]] == [(r["case_id"], r["class"]) for r in rows[0]]


def _trainer_callbacks(tmp_path: Path, *configs: str, extra: tuple[str, ...] = ()) -> list:
    from segresmamba.cli import CLI_KWARGS, SegResMambaCLI
    from segresmamba.data.base import VolumeDataModule
    from segresmamba.task import SegmentationTask

    args = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--model.net", "unet", *extra]
    for config in configs:
        args = ["-c", str(ROOT / "configs" / "callbacks" / config), *args]
    cli = SegResMambaCLI(SegmentationTask, VolumeDataModule, run=False, args=args, **CLI_KWARGS)
    return cli.trainer.callbacks


def test_callbacks_are_a_config_group(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from segresmamba.callbacks import EnergyTracker, PeakMemory, RunRecorder, StepTimer

    def kinds(callbacks: list) -> list:  # Lightning moves checkpoint callbacks to the end itself
        shown = [type(c) for c in callbacks if not type(c).__name__.startswith(("Progress", "TQDM", "RichProgress", "ModelSummary", "RichModelSummary", "SaveConfig"))]
        return [k for k in shown if k is not ModelCheckpoint] + [k for k in shown if k is ModelCheckpoint]

    default = _trainer_callbacks(tmp_path)
    assert kinds(default) == [LearningRateMonitor, PeakMemory, StepTimer, RunRecorder, ModelCheckpoint]
    checkpoint = next(c for c in default if isinstance(c, ModelCheckpoint))
    assert checkpoint.save_last and not checkpoint.save_weights_only and checkpoint.monitor == "val/dice_mean"
    # a group file appends to the list; the run record comes after what it reads
    energy = _trainer_callbacks(tmp_path, "energy.yaml", extra=("--report_checkpoint", "best"))
    assert kinds(energy) == [LearningRateMonitor, EnergyTracker, PeakMemory, StepTimer, RunRecorder, ModelCheckpoint]
    tracker, recorder = (next(c for c in energy if isinstance(c, k)) for k in (EnergyTracker, RunRecorder))
    assert tracker.country_iso_code == "DEU" and recorder.reported_checkpoint == "best"
    # a list that replaces the default one still measures every run
    sweep = _trainer_callbacks(tmp_path, "sweep.yaml")
    checkpoint = next(c for c in sweep if isinstance(c, ModelCheckpoint))
    assert not checkpoint.save_last and checkpoint.save_weights_only
    assert kinds(sweep)[-4:] == [PeakMemory, StepTimer, RunRecorder, ModelCheckpoint]
    assert sum(isinstance(c, RunRecorder) for c in sweep) == 1
