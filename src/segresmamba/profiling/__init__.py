"""Cost measurements shared by the benchmarks: MACs (fvcore with handles for custom ops), memory, timing."""

from segresmamba.profiling.macs import MacCount, UncountedOpError, count_macs

__all__ = ["MacCount", "UncountedOpError", "count_macs"]
