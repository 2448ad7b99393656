"""The pieces every benchmark tool shares: the dataset specs, the paper's tables, the worker pool, the
project folder and the sweep file's schema."""

import threading
import time
from pathlib import Path

import pytest
import yaml

from segresmamba.bench import paper, project, workers
from segresmamba.bench.sweep import Sweep
from segresmamba.data import BraTS2021DataModule, BTCVDataModule, MNI152TissueDataModule, SpleenDataModule
from segresmamba.data.spec import DATASETS, get_dataset_spec, spec_of_data_name

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, module", [("brats", BraTS2021DataModule), ("btcv", BTCVDataModule), ("spleen", SpleenDataModule), ("mni152_tissue", MNI152TissueDataModule)]
)
def test_spec_agrees_with_its_data_module(name, module, tmp_path):
    spec = get_dataset_spec(name)
    if name == "spleen":  # the Decathlon adapter reads channels and classes from dataset.json
        from segresmamba.data.write_phantoms import write_spleen_phantom

        module = module(root=str(write_spleen_phantom(tmp_path / "spleen", cases=2, size=16)), num_val=1)
        module.validate()
    assert (spec.in_channels, spec.out_channels, spec.task) == (module.in_channels, module.out_channels, module.task)
    assert list(spec.class_names) == list(module.class_names)
    assert module.name in spec.data_names and spec_of_data_name(module.name) is spec
    assert (REPO / spec.data_config).is_file()
    n_scored = spec.out_channels if spec.multilabel else spec.out_channels - 1
    assert len(spec.class_names) == n_scored


def test_spec_facts_of_the_paper_protocol():
    assert get_dataset_spec("brats").split(5) == (1001, 250)
    assert get_dataset_spec("btcv").split(5) == (24, 6)  # the paper's 24 / 6
    assert get_dataset_spec("spleen").shape_text() == "1 -> 2, 96^3 patches, volumes ~256x256x96 at 1.5x1.5x2 mm"
    assert get_dataset_spec("brats").shape_text() == "4 -> 3, 128^3 patches, volumes 240x240x155"
    assert spec_of_data_name("brats_synthetic").name == "brats" and spec_of_data_name("kits") is None
    with pytest.raises(ValueError, match="unknown dataset 'kits'; known datasets: brats, btcv"):
        get_dataset_spec("kits")
    with pytest.raises(ValueError, match="folds must be >= 2"):
        get_dataset_spec("brats").split(1)
    assert set(DATASETS) >= {"brats", "btcv", "spleen", "mni152_tissue"}


def test_one_reader_of_the_paper_tables():
    btcv = paper.paper_columns("btcv").set_index("model")
    assert btcv.loc["segresmamba", "paper_params_m"] == pytest.approx(119.98)  # Table 7 joins only BTCV
    assert btcv.loc["unetr", "paper_macs_g"] == pytest.approx(196.03)
    assert "paper_params_m" not in paper.paper_columns("brats")
    assert paper.paper_value("brats", "segresmamba", "epoch_time") == pytest.approx(267.83)
    assert paper.paper_params().set_index("model").loc["nnunet", "params_m"] == pytest.approx(31.19)


def test_project_folder_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SEGRESMAMBA_ROOT", raising=False)
    monkeypatch.chdir(REPO / "src" / "segresmamba")
    assert project.project_root() == REPO  # found above the working directory
    assert project.model_config("unet") == REPO / "configs" / "model" / "unet.yaml"
    monkeypatch.chdir(tmp_path)
    assert project.project_root() == tmp_path  # outside any project: the working directory
    assert project.model_config("unet") is None
    with pytest.raises(FileNotFoundError, match="paper_figures.csv are missing"):
        paper._read(tmp_path / "results" / "paper" / "paper_figures.csv")
    monkeypatch.setenv("SEGRESMAMBA_ROOT", str(REPO))
    assert project.project_root() == REPO and project.resolve("results") == REPO / "results"
    monkeypatch.setenv("SEGRESMAMBA_ROOT", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="SEGRESMAMBA_ROOT"):
        project.project_root()


def test_worker_pool_holds_one_job_per_device():
    busy: dict[str, int] = {}
    most: dict[str, int] = {}
    lock = threading.Lock()

    def work(job, device):
        with lock:
            busy[device] = busy.get(device, 0) + 1
            most[device] = max(most.get(device, 0), busy[device])
        time.sleep(0.02)
        with lock:
            busy[device] -= 1
        return job * 10, device

    results = dict(workers.run_on_devices(work, range(8), ["0", "1"]))
    assert sorted(results) == list(range(8)) and all(r[0] == j * 10 for j, r in results.items())
    assert set(most) == {"0", "1"} and max(most.values()) == 1  # both devices used, never two jobs on one
    assert [job for job, _ in workers.run_on_devices(lambda j, d: d, [1, 2], [None])] == [1, 2]
    with pytest.raises(ValueError, match="at least one device"):
        list(workers.run_on_devices(work, [1], []))
    env = workers.device_env("3", 2, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "2"}
    assert workers.device_env(None, 2, base={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"  # the caller's wins


def _sweep_file(tmp_path, **changes) -> Path:
    raw = {
        "name": "t", "dataset": "brats", "config": ["configs/trainer/cpu.yaml", "configs/data/brats_phantom.yaml"],
        "models": ["unet"], "folds": [0], "recipes": ["paper", "nnunet"], "out": str(tmp_path / "out"),
        "trainer": {"max_epochs": 1}, "data": {"init_args": {"patch_size": 32}}, "seed_everything": 1,
    }
    raw.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_file_is_the_clis_schema_plus_the_sweeps_keys(tmp_path):
    sweep = Sweep.load(_sweep_file(tmp_path))
    assert sweep.recipes == ["paper", "nnunet"] and sweep.patch() == (32, 32, 32)
    # every key that is not the sweep's own is a `segresmamba fit` setting, passed on as it is
    assert sweep.fit == {"trainer": {"max_epochs": 1}, "data": {"init_args": {"patch_size": 32}}, "seed_everything": 1}
    assert sweep.data_settings()["class_path"] == "segresmamba.data.BraTS2021DataModule"
    assert not sweep.uses_gpu()
    for changes, message in (
        ({"recipes": ["adamw"]}, "unknown recipe"),
        ({"models": ["nosuchnet"]}, "unknown model"),
        ({"folds": []}, "folds must be a name or a non-empty list"),
        ({"dataset": "kits"}, "unknown dataset"),
        ({"data": {"init_args": {"recipe": "nnunet"}}}, "set by the sweep's `recipes` list"),
        ({"run_record": "x.json"}, "'run_record' is set by the sweep"),
    ):
        with pytest.raises(ValueError, match=message):
            Sweep.load(_sweep_file(tmp_path, **changes))
    path = _sweep_file(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw.pop("dataset")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"missing keys \['dataset'\]"):
        Sweep.load(path)
    with pytest.raises(ValueError, match="not found"):
        Sweep.load(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "bench").glob("*.yaml") if p.stem.split("_")[0] in ("brats", "btcv", "spleen")))
def test_dataset_named_sweep_files_run_that_dataset(name):
    sweep = Sweep.load(REPO / "configs" / "bench" / f"{name}.yaml")
    assert name.split("_")[0] == sweep.dataset  # brats_quick.yaml runs brats, btcv_quick.yaml btcv, ...
    assert sweep.data_settings()["class_path"].rsplit(".", 1)[-1] in {
        "BraTS2021DataModule", "BTCVDataModule", "SpleenDataModule"}
    if name.endswith("_quick") or "synthetic" in name:
        assert sweep.phantom["kind"] == get_dataset_spec(sweep.dataset).phantom  # a phantom in the dataset's own layout
