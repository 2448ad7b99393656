"""Dataset adapters: every dataset is a :class:`VolumeDataModule` selectable from YAML."""

from segresmamba.data.base import VolumeDataModule
from segresmamba.data.synthetic import SyntheticBraTSDataModule

__all__ = ["VolumeDataModule", "SyntheticBraTSDataModule"]
