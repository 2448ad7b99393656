"""Dataset adapters: every dataset is a :class:`VolumeDataModule` selectable from YAML."""

from segresmamba.data.base import VolumeDataModule
from segresmamba.data.brats import BraTS2021DataModule
from segresmamba.data.btcv import BTCVDataModule
from segresmamba.data.mni152 import MNI152TissueDataModule
from segresmamba.data.msd import MSDDataModule
from segresmamba.data.ondisk import OnDiskDataModule
from segresmamba.data.spleen import SpleenDataModule
from segresmamba.data.synthetic import SyntheticBraTSDataModule

__all__ = [
    "VolumeDataModule",
    "SyntheticBraTSDataModule",
    "OnDiskDataModule",
    "BraTS2021DataModule",
    "BTCVDataModule",
    "MSDDataModule",
    "SpleenDataModule",
    "MNI152TissueDataModule",
]
