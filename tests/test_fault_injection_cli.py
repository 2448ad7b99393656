"""Bad input to the command line and to sweeps, one fault at a time: each is one plain line naming the file or
setting (no jsonargparse Union report, no Namespace dump, no traceback), before any work, and nothing is
written that should not be (no run folder, no result, no checkpoint)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml

from segresmamba import cli
from segresmamba.bench import sweep
from segresmamba.data.write_phantoms import write_msd_phantom
from segresmamba.errors import InputError, InputExit
from segresmamba.task import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
MSD = ["-c", str(ROOT / "configs/data/msd.yaml"), "--data.patch_size", "16", "--data.num_workers", "0"]
NOISE = ("Union", "Namespace", "Traceback", "Given value")


@pytest.fixture(scope="module")
def msd_src(tmp_path_factory):
    """A one-channel, two-class MSD task (four 16^3 cases)."""
    return write_msd_phantom(tmp_path_factory.mktemp("msd") / "Task09_Spleen", cases=4, size=16)


@pytest.fixture(scope="module")
def foreign_checkpoint(tmp_path_factory):
    """A checkpoint of a 4-channel, 3-class BraTS-like unet: it does not fit the one-channel MSD task."""
    task = SegmentationTask(net="unet", in_channels=4, out_channels=3, img_size=16)
    path = tmp_path_factory.mktemp("ckpt") / "brats-unet.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def _dataset_json(edit):
    def fault(root: Path, tmp: Path) -> list[str]:
        path = root / "dataset.json"
        text = path.read_text()
        path.write_text(edit(text))
        return ["fit", *MSD, "--data.root", str(root)]
    return fault


def _without_labels(text: str) -> str:
    meta = json.loads(text)
    del meta["labels"]
    return json.dumps(meta)


def _bad_yaml(root: Path, tmp: Path) -> list[str]:
    (tmp / "trainer.yaml").write_text("trainer:\n  max_epochs: 1\n  devices: [1,\n")
    return ["fit", "-c", str(tmp / "trainer.yaml")]


def _unknown_data_key(root: Path, tmp: Path) -> list[str]:
    (tmp / "data.yaml").write_text("data:\n  init_args:\n    patch_sise: 16\n")
    return ["fit", "-c", str(tmp / "data.yaml")]


def _garbage_checkpoint(root: Path, tmp: Path) -> list[str]:
    (tmp / "broken.ckpt").write_bytes(b"PK\x03\x04 cut short")
    return ["test", *MSD, "--data.root", str(root), "--ckpt_path", str(tmp / "broken.ckpt")]


# fault: (command line for (task folder, scratch folder), what the message must name)
CLI_FAULTS = {
    "dataset.json lacks labels": (_dataset_json(_without_labels), ["dataset.json", "'labels'"]),
    "dataset.json is not JSON": (_dataset_json(lambda text: text[:40]), ["dataset.json"]),
    "unknown model name": (lambda root, tmp: ["fit", *MSD, "--data.root", str(root), "--model.net", "segresmambo"],
                           ["'segresmambo'", "known models"]),
    "abbreviated option": (lambda root, tmp: ["fit", "--trainer.max_epoch", "3"], ["--trainer.max_epoch"]),
    "wrong type in a data setting": (lambda root, tmp: ["fit", *MSD, "--data.root", str(root), "--data.patch_size", "big"],
                                     ["data.patch_size", "big"]),
    "unknown data setting in a config file": (_unknown_data_key, ["data:", "'patch_sise'"]),
    "config YAML syntax error": (_bad_yaml, ["trainer.yaml", "line 4"]),
    "missing checkpoint": (lambda root, tmp: ["test", *MSD, "--data.root", str(root), "--ckpt_path", str(tmp / "gone.ckpt")],
                           ["gone.ckpt", "no such checkpoint file"]),
    "corrupt checkpoint": (_garbage_checkpoint, ["broken.ckpt", "not a PyTorch checkpoint"]),
}


@pytest.mark.parametrize("fault", sorted(CLI_FAULTS))
def test_cli_fault_is_one_plain_line(fault, msd_src, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "Task09_Spleen"
    root.mkdir()
    for item in msd_src.rglob("*"):  # a copy the fault may edit
        if item.is_file():
            (root / item.relative_to(msd_src)).parent.mkdir(parents=True, exist_ok=True)
            (root / item.relative_to(msd_src)).write_bytes(item.read_bytes())
    command, named = CLI_FAULTS[fault]
    args = command(root, tmp_path)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(InputExit) as stopped:
        cli.main(args)
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    assert all(name in lines[0] for name in named), lines[0]
    assert not any(word in lines[0] for word in NOISE), lines[0]
    assert set(tmp_path.rglob("*")) == before  # no run folder, no config, no record


def test_checkpoint_of_other_data_is_named_before_loading(msd_src, foreign_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for subcommand in ("test", "validate", "predict"):
        with pytest.raises(InputExit):
            cli.main([subcommand, *MSD, "--data.root", str(msd_src), "--ckpt_path", str(foreign_checkpoint)])
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert str(foreign_checkpoint) in line
        assert "in_channels is 4 in the checkpoint but 1 here" in line and "out_channels is 3 in the checkpoint but 2 here" in line
        assert "size mismatch" not in line
    assert not list(tmp_path.rglob("*"))  # no run folder, no masks, no record


def test_the_command_exits_2_without_traceback_unless_debug(msd_src, tmp_path):
    broken = tmp_path / "Task09_Spleen"
    broken.mkdir()
    (broken / "dataset.json").write_text(_without_labels((msd_src / "dataset.json").read_text()))
    command = [sys.executable, "-m", "segresmamba", "fit", *MSD, "--data.root", str(broken)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SEGRESMAMBA_DEBUG", None)
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: dataset json {broken / 'dataset.json'}: 'labels' must be a non-empty object like {{\"0\": ...}}"
    assert not any(word in out.stderr for word in NOISE), out.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def test_debug_keeps_the_traceback(msd_src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGRESMAMBA_DEBUG", "1")
    with pytest.raises(InputError, match="ckpt_path .*gone.ckpt: no such checkpoint file"):
        cli.main(["test", *MSD, "--data.root", str(msd_src), "--ckpt_path", str(tmp_path / "gone.ckpt")])


# -- sweeps ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tmp_path_factory.mktemp("brats") / "phantom"


def _sweep_file(tmp_path: Path, phantom: Path, **keys) -> Path:
    spec = {
        "name": "faults", "dataset": "brats", "config": ["configs/trainer/cpu.yaml", "configs/data/brats_phantom.yaml"],
        "phantom": {"kind": "brats", "out": str(phantom), "cases": 5, "size": 32, "seed": 0},
        "models": ["unet"], "folds": [0], "recipes": ["paper", "nnunet"],
        "out": str(tmp_path / "results"), "runs_dir": str(tmp_path / "runs"),
        "trainer": {"max_epochs": 1, "limit_train_batches": 1, "enable_progress_bar": False},
        "data": {"init_args": {"patch_size": 32, "batch_size": 1, "cache_rate": 0.0}},
    }
    for key, value in keys.items():
        spec[key] = sweep.merge(spec.get(key) or {}, value) if isinstance(value, dict) else value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# fault: (sweep file keys, the setting the message names)
SWEEP_FAULTS = {
    "typo in trainer": ({"trainer": {"max_epochz": 1}}, "trainer.max_epochz: no such setting"),
    "abbreviated trainer key": ({"trainer": {"max_epoch": 1}}, "trainer.max_epoch: no such setting"),
    "typo in model": ({"model": {"lrr": 0.1}}, "model.lrr: no such setting"),
    "wrong type in trainer": ({"trainer": {"max_epochs": "three"}}, "trainer.max_epochs: expected int, got three"),
    "typo in data": ({"data": {"init_args": {"batch_sise": 1}}}, "'batch_sise' is not accepted"),
    "fold the data does not have": ({"folds": [0, 7]}, "fold 7: fold must be within [0, 4], got 7"),
}


@pytest.mark.parametrize("fault", sorted(SWEEP_FAULTS))
def test_sweep_settings_are_parsed_for_every_run_before_the_first(fault, phantom, tmp_path):
    keys, named = SWEEP_FAULTS[fault]
    path = _sweep_file(tmp_path, phantom, **keys)
    with pytest.raises(InputError) as refused:
        sweep.run_sweep(path)
    message = str(refused.value)
    assert message.startswith(f"sweep file {path}: ") and named in message, message
    assert not any(word in message for word in NOISE), message
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_sweep_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: broken\ndataset: brats\nmodels: [unet, segresmamba\nfolds: [0]\n")
    with pytest.raises(InputExit):
        sweep.main([str(path)])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: sweep file {path}, line 4, column 6: not valid YAML"), err
    assert "Traceback" not in err


def test_one_model_or_fold_may_stand_alone(phantom, tmp_path):
    loaded = sweep.Sweep.load(_sweep_file(tmp_path, phantom, models="unet", folds=0, recipes="paper"))
    assert (loaded.models, loaded.folds, loaded.recipes) == (["unet"], [0], ["paper"])
    with pytest.raises(InputError, match=r"sweep file .*sweep.yaml: unknown model\(s\) \['unte'\]"):
        sweep.Sweep.load(_sweep_file(tmp_path, phantom, models="unte"))


def test_sweep_exits_non_zero_when_a_run_failed(phantom, tmp_path, capsys):
    path = _sweep_file(tmp_path, phantom, recipes=["paper"])
    failed = tmp_path / "results" / "paper" / "unet" / "fold0" / "metrics.json"
    failed.parent.mkdir(parents=True)
    failed.write_text(json.dumps({"model": "unet", "recipe": "paper", "fold": 0, "status": "error", "error": "boom"}))
    assert sweep.main([str(path)]) == 1
    out = capsys.readouterr()
    assert "skip unet [paper] fold 0: finished (error)" in out.out  # a failed run waits for --retry-failed
    assert "error: 1 of 1 runs did not finish: unet [paper] fold 0 (error)" in out.err
    assert json.loads(failed.read_text())["error"] == "boom" and not (tmp_path / "runs").exists()


def test_a_value_error_from_data_setup_is_bad_data_and_any_other_a_bug():
    class Data(lightning.LightningDataModule):
        def setup(self, stage: str) -> None:
            raise ValueError("case7: label file labelsTr/case7.nii.gz is empty")

    def raised(call) -> BaseException:
        try:
            call()
        except ValueError as err:
            return err
        raise AssertionError("nothing was raised")

    assert cli.cli_error_message(raised(lambda: Data().setup("fit"))) == "case7: label file labelsTr/case7.nii.gz is empty"
    assert cli.cli_error_message(raised(lambda: int("x"))) is None  # keeps its traceback
