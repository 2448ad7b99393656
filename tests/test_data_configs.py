"""configs/data/*.yaml parse as Lightning CLI data configs and build their data modules."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from segresmamba.data import SyntheticBraTSDataModule, VolumeDataModule
from segresmamba.data.write_phantoms import write_spleen_phantom

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
OURS = ["brats", "brats_phantom", "btcv", "spleen", "msd", "mni152_tissue"]


def _build(path: Path, **overrides) -> VolumeDataModule:
    parser = ArgumentParser()
    parser.add_subclass_arguments(VolumeDataModule, "data")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["init_args"].update(overrides)
    parsed = parser.parse_object(cfg)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(parsed).data


@pytest.mark.parametrize("name", OURS)
def test_config_builds(name, tmp_path):
    overrides = {}
    if name in ("spleen", "msd"):  # these read dataset.json when built
        overrides["root"] = str(write_spleen_phantom(tmp_path / "sp", cases=3, size=16))
    dm = _build(CONFIGS / f"{name}.yaml", **overrides)
    assert isinstance(dm, VolumeDataModule)
    assert dm.in_channels >= 1 and dm.out_channels >= 2 and dm.task in ("multilabel", "multiclass")
    assert len(dm.class_names) == (dm.out_channels if dm.task == "multilabel" else dm.out_channels - 1)


@pytest.mark.parametrize("device,pinned", [("cuda", True), ("cpu", False)])
def test_training_batches_are_pinned_for_a_cuda_trainer_only(device, pinned):
    """A CUDA fit's training batches come from pinned memory (their copy to the GPU then does not wait for its
    queued work); evaluation volumes never are, and no trainer means no pinning."""
    dm = SyntheticBraTSDataModule(volume_size=32, num_train=2, num_val=1, num_test=1, patch_size=16)
    dm.setup("fit")
    assert not dm.train_dataloader().pin_memory
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    assert dm.train_dataloader().pin_memory is pinned
    assert not dm.val_dataloader().pin_memory

