"""One spec per benchmark dataset: the facts every benchmark tool needs without opening the data.

Channels, task, scored classes, the paper's patch and spacing, a typical whole volume (for sliding-window
timing), the case counts of the paper's protocol, the data config that reads the real set and the phantom
writer that fakes its layout. The sweep, the efficiency profiler, the parameter table, the GPU-hours
estimate, aggregation and the plots read these instead of spelling the numbers again.

Sources: SegResMamba (Das et al., MIDL 2025, §3.1 and App. A), BraTS 2021 (Baid et al. 2021, 1,251
labelled cases, 1 mm, 240 x 240 x 155), BTCV (Landman et al. 2015, 30 labelled CT, the paper's 24 / 6
split), MSD Task09 Spleen (Antonelli et al. 2022, 41 labelled CT), MNI152 2009 tissue classes (Fonov et al.
2011, one template bundled with nilearn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from segresmamba.data.phantoms import BRATS_CHANNELS, BTCV_ORGANS

__all__ = ["DatasetSpec", "DATASETS", "get_dataset_spec", "list_dataset_specs", "spec_of_data_name"]


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one benchmark dataset.

    Attributes:
        name: the key used in configs, file names and result tables (``brats``, ``btcv``, ...).
        title: the dataset's published name, for table headers.
        in_channels: image channels (modalities).
        out_channels: network outputs (multiclass: background included).
        task: ``multilabel`` (overlapping regions, sigmoid) or ``multiclass`` (softmax, background not scored).
        class_names: the scored classes, in output order.
        patch: the training patch of the paper's protocol (also the sliding-window ROI).
        spacing: target voxel spacing in mm of the paper's preprocessing.
        volume: a typical whole volume after resampling, for timing sliding-window inference.
        volume_is_typical: True when volumes vary around ``volume`` (CT after resampling), False when fixed.
        cases: labelled cases the paper's protocol draws training and validation cases from.
        data_names: the ``dataset`` names data modules of this dataset record in ``metrics.json``.
        data_config: the data config under ``configs/data/`` that reads the real set.
        phantom: the :mod:`segresmamba.data.write_phantoms` kind that writes a synthetic set in this layout,
            or None when the dataset needs none (it ships with a library).
    """

    name: str
    title: str
    in_channels: int
    out_channels: int
    task: Literal["multilabel", "multiclass"]
    class_names: tuple[str, ...]
    patch: tuple[int, int, int]
    spacing: tuple[float, float, float]
    volume: tuple[int, int, int]
    volume_is_typical: bool
    cases: int
    data_names: tuple[str, ...]
    data_config: str
    phantom: str | None

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def shape_text(self) -> str:
        """``4 -> 3, 128^3 patches, volumes 240x240x155`` (spacing added where volumes vary)."""
        side = self.patch[0] if len(set(self.patch)) == 1 else None
        patch = f"{side}^3" if side else "x".join(map(str, self.patch))
        volume = "x".join(map(str, self.volume))
        if self.volume_is_typical:
            spacing = "x".join(f"{s:g}" for s in self.spacing)
            volume = f"~{volume} at {spacing} mm"
        return f"{self.in_channels} -> {self.out_channels}, {patch} patches, volumes {volume}"

    def split(self, folds: int) -> tuple[int, int]:
        """(training, validation) cases per fold when ``cases`` are cut into ``folds`` folds."""
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        val = round(self.cases / folds)
        return self.cases - val, val


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="brats", title="BraTS 2021", in_channels=len(BRATS_CHANNELS), out_channels=3, task="multilabel",
            class_names=("TC", "WT", "ET"), patch=(128, 128, 128), spacing=(1.0, 1.0, 1.0),
            volume=(240, 240, 155), volume_is_typical=False, cases=1251,
            data_names=("brats2021", "brats_synthetic"), data_config="configs/data/brats.yaml", phantom="brats",
        ),
        DatasetSpec(
            name="btcv", title="BTCV", in_channels=1, out_channels=len(BTCV_ORGANS) + 1, task="multiclass",
            class_names=tuple(BTCV_ORGANS), patch=(128, 128, 128), spacing=(1.5, 1.5, 2.0),
            volume=(256, 256, 128), volume_is_typical=True, cases=30,
            data_names=("btcv",), data_config="configs/data/btcv.yaml", phantom="btcv",
        ),
        DatasetSpec(
            name="spleen", title="MSD Spleen", in_channels=1, out_channels=2, task="multiclass",
            class_names=("spleen",), patch=(96, 96, 96), spacing=(1.5, 1.5, 2.0),
            volume=(256, 256, 96), volume_is_typical=True, cases=41,
            data_names=("msd_spleen",), data_config="configs/data/spleen.yaml", phantom="spleen",
        ),
        DatasetSpec(
            name="mni152_tissue", title="MNI152 2009 tissue", in_channels=1, out_channels=4, task="multiclass",
            class_names=("CSF/other", "GM", "WM"), patch=(64, 64, 64), spacing=(2.0, 2.0, 2.0),
            volume=(99, 117, 95), volume_is_typical=False, cases=1,
            data_names=("mni152_tissue",), data_config="configs/data/mni152_tissue.yaml", phantom=None,
        ),
    )
}
"""The benchmark datasets by name."""


def list_dataset_specs() -> list[str]:
    """Names of the benchmark datasets."""
    return sorted(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec called ``name``; ValueError naming the known datasets otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_dataset_specs())}")
    return DATASETS[name]


def spec_of_data_name(data_name: str) -> DatasetSpec | None:
    """The spec whose data modules record ``data_name`` (e.g. ``msd_spleen`` -> spleen), or None."""
    for spec in DATASETS.values():
        if data_name in spec.data_names:
            return spec
    return None
