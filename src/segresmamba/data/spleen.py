"""MSD Task09 Spleen (Antonelli et al. 2022, "The Medical Segmentation Decathlon", Nature Communications
13:4128; spleen data from Memorial Sloan Kettering Cancer Center)."""

from __future__ import annotations


from segresmamba.data.msd import MSDDataModule

__all__ = ["SpleenDataModule"]


class SpleenDataModule(MSDDataModule):
    """MSD Task09 Spleen: portal-venous CT, 41 labelled training cases (+20 unlabelled test cases),
    1 channel -> 2 classes (background, spleen), task "multiclass"; Dice is the spleen Dice.

    On disk (the Decathlon tarball, ``._*`` AppleDouble files ignored)::

        <root>/dataset.json   <root>/imagesTr/spleen_N.nii.gz   <root>/labelsTr/spleen_N.nii.gz   <root>/imagesTs/

    Transforms (MONAI spleen tutorial; the paper names ScaleIntensityRange, Orientation, CropForeground,
    Spacing): load, channel first, RAS, Spacing ``spacing`` (1.5, 1.5, 2.0), window ``intensity_window``
    (-57, 164) HU -> [0, 1] clipped, CropForeground, RandCropByPosNegLabel 96^3 x ``num_samples`` (4),
    flips/rot90 p=0.1, RandShiftIntensity 0.1; evaluation on the whole resampled volume.

    Splits: the paper's "41 train / 20 test" cannot be scored (the 20 test labels are not public), so the
    41 labelled cases are split: ``"holdout"`` 32 train / 9 validation (``num_val`` = 9) or ``"kfold"``
    (``num_folds`` = 5, ``fold`` validates). The test split is the validation split.

    Args: as :class:`~segresmamba.data.msd.MSDDataModule`, with the spleen defaults above (``spacing``
    and ``intensity_window`` ``None``: the paper recipe's 1.5 x 1.5 x 2 mm and (-57, 164) HU, or the plan's
    values under ``recipe: nnunet``). The
    ``dataset.json`` must declare one modality and the labels background/spleen.
    """

    name = "msd_spleen"
    paper_spacing = (1.5, 1.5, 2.0)
    paper_window = (-57.0, 164.0)

    def __init__(
        self,
        num_val: int | None = 9,
        **kwargs,
    ) -> None:
        super().__init__(num_val=num_val, **kwargs)
        if self.in_channels != 1 or self.out_channels != 2:
            raise ValueError(
                f"{self.name}: {self.dataset_json} declares {self.in_channels} modality(ies) and "
                f"{self.out_channels} label(s); Task09 Spleen has 1 (CT) and 2 (background, spleen)"
            )
