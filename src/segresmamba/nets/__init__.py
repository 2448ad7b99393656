"""Architectures of the suite's own models (one file each); importing this registers them."""

from segresmamba.nets.segresmamba import SegResMamba

__all__ = ["SegResMamba"]
