"""configs/data/*.yaml parse as Lightning CLI data configs and build their data modules."""

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from segresmamba.data import VolumeDataModule
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
