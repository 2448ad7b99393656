"""The benchmark API: sweeps over recipes, models and folds; the efficiency profiler; aggregation into
tables and plots; the parameter table and the GPU-hours estimate.

    from segresmamba.bench import run_sweep, profile_model, aggregate

    run_sweep("configs/bench/brats_quick.yaml", recipes=["paper", "nnunet"])   # one metrics.json per run
    row = profile_model("segresmamba", "brats")                                 # params, MACs, memory, step time
    summary = aggregate("results/quick/brats")                                  # summary.csv/.md and the plots

Each has a thin command line: ``python -m segresmamba.bench.sweep|efficiency|aggregate|params_table|gpu_hours``.
Dataset facts come from :mod:`segresmamba.data.spec`, the paper's figures from :mod:`segresmamba.bench.paper`,
and relative paths are read against the project folder (:func:`segresmamba.bench.project.project_root`).
"""

import importlib

__all__ = ["run_sweep", "Sweep", "profile_model", "profile", "aggregate"]

_HOMES = {"run_sweep": "sweep", "Sweep": "sweep", "profile_model": "efficiency", "profile": "efficiency", "aggregate": "aggregate"}


def __getattr__(name: str):
    # imported on first use, so `python -m segresmamba.bench.<tool>` runs its module once, as __main__
    if name in _HOMES:
        return getattr(importlib.import_module(f"segresmamba.bench.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'segresmamba.bench' has no attribute {name!r}")
