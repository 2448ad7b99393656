"""Every registered architecture, one file each; importing this package registers them all.

The paper's model: ``segresmamba`` and its released-code ablation ``segresmamba_notom``. MONAI builds:
``unetr``, ``swinunetr``, ``unet``, ``segresnet``, ``mednext``, ``nnunet`` (DynUNet with an nnU-Net plan).
This suite's reimplementations: ``segmamba``, ``uxnet3d``. Shared blocks live in :mod:`.blocks`, argument
checks in :mod:`.common`.
"""

from segresmamba.models import mednext, nnunet, segmamba, segresnet, swinunetr, unet, unetr, uxnet3d
from segresmamba.models.segresmamba import SegResMamba

__all__ = ["SegResMamba", "mednext", "nnunet", "segmamba", "segresnet", "swinunetr", "unet", "unetr", "uxnet3d"]
