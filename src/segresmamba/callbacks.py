"""Lightning callbacks that measure a run: peak memory, step time, energy/CO2, and the run record."""

from __future__ import annotations

import collections
import csv
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from segresmamba.provenance import provenance
from segresmamba.ssm.cuda_graphs import ToMCudaGraphs
from segresmamba.step_graphs import StepCudaGraphs
from segresmamba.ssm.scan import auto_choices, auto_failures

GIB = 1024**3


class PeakMemory(L.Callback):
    """Peak CUDA memory of training steps (``max_memory_allocated`` and ``reserved``), in GiB.

    The count starts after the first training step, which alone holds one-off work: cuDNN autotuning
    and the scan dispatch measuring its backends on copies of the scan inputs. A fit of a single step
    reports that step. Not measured (None) on a CPU: process RSS is not comparable to a GPU's allocator peak.
    """

    def __init__(self) -> None:
        self.allocated_gib: float | None = None
        self.reserved_gib: float | None = None
        self._after_first = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._after_first = False
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._after_first or trainer.global_step < 1:
            return
        self._after_first = True
        if pl_module.device.type == "cuda" and trainer.estimated_stepping_batches > 1:
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self.allocated_gib = torch.cuda.max_memory_allocated(pl_module.device) / GIB
            self.reserved_gib = torch.cuda.max_memory_reserved(pl_module.device) / GIB


class StepTimer(L.Callback):
    """Time of each training step (data already on the device), and wall time of each epoch.

    The median step after ``warmup`` steps is the figure reported; epoch times include data loading.

    On a GPU a step is timed by CUDA events recorded on the stream at the step's start and end: the time the
    GPU's timeline spends from the one to the other. That is the step's wall time whether the host or the GPU
    bounds it, without making the host wait for the GPU. Synchronising around each step (as a wall clock needs)
    would stop the host from queueing step i + 1 while the GPU finishes step i, and so slow down the very fit it
    measures. The events are read once they have passed (checked without blocking at each step end) and at the
    end of each epoch. On a CPU the wall clock times each step.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.step_s: list[float] = []
        self.epoch_s: list[float] = []
        self._t0 = self._e0 = 0.0
        self._start: torch.cuda.Event | None = None
        self._pending: collections.deque = collections.deque()  # (start, end) events not yet read

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._e0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read_events(wait=True)
        self.epoch_s.append(time.perf_counter() - self._e0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            self.step_s.append(time.perf_counter() - self._t0)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end))
        self._start = None
        self._read_events(wait=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._read_events(wait=True)

    def _read_events(self, wait: bool) -> None:
        """Move the times of passed step events into ``step_s`` (all of them with ``wait``), in step order."""
        while self._pending and (wait or self._pending[0][1].query()):
            start, end = self._pending.popleft()
            end.synchronize()
            self.step_s.append(start.elapsed_time(end) / 1000)

    @property
    def median_step_ms(self) -> float | None:
        self._read_events(wait=True)
        steps = self.step_s[self.warmup :] or self.step_s
        return statistics.median(steps) * 1000 if steps else None


class EnergyTracker(L.Callback):
    """Energy (kWh) and emissions (kg CO2eq) of ``fit`` from codecarbon's ``OfflineEmissionsTracker``.

    Offline: no network; the grid intensity comes from ``country_iso_code`` (ISO 3166 alpha-3). GPU
    energy is read through NVML; CPU and RAM power are codecarbon's estimates where RAPL is unreadable.
    codecarbon swallows its own errors, so a missing result is reported as None, never as zero.

    Args:
        country_iso_code: grid whose carbon intensity is used (e.g. "DEU", "USA", "FRA").
        output_dir: where ``emissions.csv`` goes; defaults to the run directory.
        measure_power_secs: sampling period.
        tracking_mode: ``machine`` (whole host) or ``process``.
    """

    def __init__(self, country_iso_code: str = "DEU", output_dir: str | None = None, measure_power_secs: float = 15.0, tracking_mode: str = "machine") -> None:
        if len(country_iso_code) != 3 or not country_iso_code.isalpha():
            raise ValueError(f"country_iso_code must be an ISO 3166 alpha-3 code such as 'DEU', got {country_iso_code!r}")
        if tracking_mode not in ("machine", "process"):
            raise ValueError(f"tracking_mode must be 'machine' or 'process', got {tracking_mode!r}")
        self.country_iso_code = country_iso_code.upper()
        self.output_dir = output_dir
        self.measure_power_secs = measure_power_secs
        self.tracking_mode = tracking_mode
        self.result: dict[str, Any] | None = None
        self._tracker = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
        from codecarbon import OfflineEmissionsTracker

        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)  # codecarbon silently does nothing without it
        self._out = out
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=self.country_iso_code, output_dir=str(out), project_name="segresmamba",
            measure_power_secs=self.measure_power_secs, tracking_mode=self.tracking_mode, log_level="error",
            save_to_file=True, allow_multiple_runs=True,
        )
        self._tracker.start()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._tracker is None:
            return
        kg = self._tracker.stop()
        data = self._tracker.final_emissions_data
        self._tracker = None
        if kg is None or data is None:
            logging.getLogger(__name__).warning("codecarbon produced no measurement; energy and CO2 are not reported")
            return
        self.result = {
            "energy_kwh": float(data.energy_consumed),
            "co2_kg": float(kg),
            "duration_s": float(data.duration),
            "country_iso_code": self.country_iso_code,
            "tracking_mode": self.tracking_mode,
            "gpu_energy_kwh": float(data.gpu_energy),
            "cpu_energy_kwh": float(data.cpu_energy),
            "ram_energy_kwh": float(data.ram_energy),
            "emissions_csv": str(self._out / "emissions.csv"),
        }


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def cases_file(record: Path) -> Path:
    """``test_cases.csv`` beside ``metrics.json`` (``<stem>_test_cases.csv`` beside a record named otherwise)."""
    return record.with_name("test_cases.csv" if record.name == "metrics.json" else f"{record.stem}_test_cases.csv")


def write_case_rows(path: Path, rows: list[dict]) -> None:
    """The per-case, per-class rows of a test (:func:`segresmamba.metrics.case_rows`) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _checkpoint_kind(ckpt_path: str | None, default: str) -> str:
    """``last`` / ``best`` from a checkpoint's file name (``None``: the weights in memory at the end of fit)."""
    if ckpt_path is None:
        return default
    name = Path(ckpt_path).name
    if name.startswith("last") or ckpt_path == "last":
        return "last"
    if name.startswith("best") or ckpt_path == "best":
        return "best"
    return name


class RunRecorder(L.Callback):
    """Writes ``metrics.json`` into the run directory after fit and after test.

    It holds the validation Dice of every epoch, the best and last epoch (both kept), test Dice and the
    checkpoint it comes from, wall time, step times, peak memory, energy, the recipe and the resolved
    settings, and the provenance (git SHA, versions, device, precision). Written on rank 0 only.

    Cases that validation left out (``skip_bad_cases: true``) are listed with why in ``skipped_cases``.

    After a test it also writes the per-case, per-class Dice and HD95 (``test_cases.csv`` beside
    ``metrics.json``) and records their means (``test/dice_mean``, ``test/hd95_mean`` and per class), the
    evaluation space (``original`` or ``resampled``) and the number of cases.

    Which checkpoint a test reports is recorded as ``reported_checkpoint``: ``last`` (the final weights,
    nnU-Net's practice and the default: no checkpoint is chosen on the cases it is scored on) or ``best``
    (the epoch with the best validation Dice; optimistic when the test cases are the validation cases, as in
    the paper's protocol).

    Args:
        path: file to write; defaults to ``<log_dir>/metrics.json``.
        reported_checkpoint: the checkpoint the run reports, ``last`` or ``best``.
    """

    def __init__(self, path: str | None = None, reported_checkpoint: str = "last") -> None:
        if reported_checkpoint not in ("last", "best"):
            raise ValueError(f"reported_checkpoint must be 'last' or 'best', got {reported_checkpoint!r}")
        self.path = path
        self.reported_checkpoint = reported_checkpoint
        self.history: list[dict[str, float | None]] = []
        self.untrained: dict[str, Any] | None = None
        self.record: dict[str, Any] = {}
        self._fit_t0 = 0.0

    def _file(self, trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "metrics.json"

    def _find(self, trainer, kind: type):
        return next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, kind)), None)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # not on_validation_epoch_end: callbacks run before the module's hook that logs the Dice
        metrics = {k: _finite(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if trainer.sanity_checking:
            # the sanity check scores the untrained network: the floor a trained one must clear
            batches = trainer.num_sanity_val_steps
            self.untrained = {**metrics, "batches": "all" if batches == float("inf") else batches}
            return
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    def _common(self, trainer, pl_module) -> dict[str, Any]:
        dm = trainer.datamodule
        hp = dict(pl_module.hparams)
        recipe = getattr(pl_module, "recipe_settings", None)
        return {
            "model": hp.get("net"),
            "recipe": recipe.name if recipe is not None else None,
            "recipe_settings": recipe.as_dict() if recipe is not None else None,
            "net_kwargs": hp.get("net_kwargs") or {},
            "params": sum(p.numel() for p in pl_module.parameters()),
            "data": dm.describe() if dm is not None and hasattr(dm, "describe") else None,
            # cases that failed validation and were left out (skip_bad_cases: true), each with why
            "skipped_cases": list(getattr(dm, "skipped_cases", None) or []),
            "hparams": {k: v for k, v in hp.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
            # the strategy's device, not the module's: on_fit_end runs after teardown has moved the module to the CPU
            "provenance": provenance(trainer.strategy.root_device, str(trainer.precision)),
            # which scan backend scan_backend="auto" measured fastest, per scan signature (empty off CUDA)
            "scan_auto_choices": auto_choices(),
            # backends that failed while auto measured them and so were not used (each warned once)
            "scan_auto_failures": auto_failures(),
            # ToM layers whose training steps replayed CUDA graphs (ToMCudaGraphs), None without it
            "cuda_graph_layers": getattr(self._find(trainer, ToMCudaGraphs), "captured", None),
            # the image batch shape whose training steps replayed whole-step CUDA graphs (StepCudaGraphs), None without
            "step_graphs": getattr(self._find(trainer, StepCudaGraphs), "captured", None),
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self._fit_t0
        timer, memory, energy = (self._find(trainer, k) for k in (StepTimer, PeakMemory, EnergyTracker))
        scored = [r for r in self.history if r.get("val/dice_mean") is not None]
        best = max(scored, key=lambda r: r["val/dice_mean"]) if scored else None
        self.record.update(self._common(trainer, pl_module))
        self.record["fit"] = {
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
            "wall_time_s": wall,
            "median_step_ms": timer.median_step_ms if timer else None,
            "epoch_time_s": timer.epoch_s if timer else None,
            "peak_memory_allocated_gib": memory.allocated_gib if memory else None,
            "peak_memory_reserved_gib": memory.reserved_gib if memory else None,
            "energy": energy.result if energy else None,
            "val_history": self.history,
            "untrained": self.untrained,
            "best": best,
            "last": self.history[-1] if self.history else None,
            "reported": self.reported_checkpoint,
            "interrupted": trainer.interrupted,
        }
        self._write(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        if not self.record:
            self.record.update(self._common(trainer, pl_module))
        self.record["test"] = {
            k: _finite(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        self.record["test"]["ckpt_path"] = trainer.ckpt_path
        self.record["test"].update(self._write_cases(trainer, pl_module))
        self.record["test"]["reported_checkpoint"] = _checkpoint_kind(trainer.ckpt_path, self.reported_checkpoint)
        self.record["reported_checkpoint"] = self.record["test"]["reported_checkpoint"]
        self._write(trainer)

    def cases_file(self, trainer) -> Path:
        return cases_file(self._file(trainer))

    def _write_cases(self, trainer, pl_module) -> dict[str, Any]:
        """Write the test's per-case, per-class rows (case_id, class, dice, hd95_mm, eval_space, spacing_mm;
        :attr:`SegmentationTask.eval_cases`) on rank 0, and return what the record says of them."""
        rows = (getattr(pl_module, "eval_cases", None) or {}).get("test") or []
        facts: dict[str, Any] = {
            "eval_space": dict(pl_module.hparams).get("eval_space"),
            "num_cases": len({row["case_id"] for row in rows}),
        }
        if not rows:
            return facts
        path = self.cases_file(trainer)
        if trainer.is_global_zero:
            write_case_rows(path, rows)
        facts["cases_csv"] = str(path)
        return facts

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        path = self._file(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        # fit and test may be separate processes writing one record: keep what the other wrote
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.update(self.record)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(path)
