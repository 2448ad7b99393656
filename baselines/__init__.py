"""Baselines of the benchmark, registered under one name each (importing this package registers them all).

MONAI builds: ``unetr``, ``swinunetr``, ``unet``, ``segresnet``, ``mednext``, ``nnunet`` (DynUNet with an
nnU-Net plan). This suite's reimplementations: ``segmamba``, ``uxnet3d``.
"""

from baselines import mednext, nnunet, segmamba, segresnet, swinunetr, unet, unetr, uxnet3d

__all__ = ["mednext", "nnunet", "segmamba", "segresnet", "swinunetr", "unet", "unetr", "uxnet3d"]
