"""Sweep runner: recipe x model x fold on one dataset, each run one ``segresmamba fit --test_after_fit true``
(fit, then test of the reported checkpoint, in one process), all through the same CLI as a user's runs.

    python -m segresmamba.bench.sweep configs/bench/brats_quick.yaml
    python -m segresmamba.bench.sweep configs/bench/brats.yaml --data-root /data/BraTS2021 --recipes nnunet --gpus 0,1

or from Python: ``run_sweep("configs/bench/brats_quick.yaml", recipes=["paper", "nnunet"])``.

A sweep file is a ``segresmamba fit --config`` file (``trainer:``, ``model:``, ``data:`` blocks and any other
setting of the CLI, exactly as the CLI reads them) plus the keys of the sweep itself (:class:`Sweep`):
``name``, ``dataset`` (a :mod:`segresmamba.data.spec` name), ``config`` (the ``-c`` files stacked first,
e.g. the trainer and data configs), ``models``, ``folds``, ``recipes``, ``out``, and optionally ``protocol``,
``phantom`` and ``runs_dir``. Each run gets the command line

    segresmamba fit -c <config...> -c configs/model/<model>.yaml -c configs/recipe/<recipe>.yaml -c <run>/run.yaml

where ``run.yaml`` holds the sweep file's CLI settings with the run's fold, log folder and record path.
Every run writes ``<out>/<recipe>/<model>/fold<k>/metrics.json`` (Dice per class and mean, the recipe and
the reported checkpoint, best and last epoch, wall time, peak memory, energy and CO2 from codecarbon, the
paper's calculator CO2 for the same hours, resolved config, git SHA, versions, device). Checkpoints and
logs stay under ``<runs_dir>/<name>/<recipe>/<model>/fold<k>``.

Before the first run: every model's patch is checked against its registry facts, every run's full command
(trainer, model and data settings, options never abbreviated) is parsed by the CLI's own parser, and the
data is validated; any failure stops the sweep with one message naming the sweep file and the setting or
file at fault. Resumable and idempotent: a run whose ``metrics.json`` says ``ok`` is never run again; a
failed run (``status: error``: a crash, out of memory) is skipped unless ``retry_failed``; a run stopped by
SIGINT or SIGTERM (``status: interrupted``) or without a record is run again. Each run's process has a
process group of its own: a signal to the sweep stops the run in flight and everything it started
(DataLoader workers included), records it as interrupted and exits with 128 + the signal number (130 for
Ctrl-C, 143 for SIGTERM). The command exits with 1 when any run of the sweep failed.

External baselines: ``nnunetv2`` in ``models`` is nnU-Net v2 run as nnU-Net (:mod:`segresmamba.bench.nnunetv2`),
once per fold under the recipe ``nnunetv2`` whatever the sweep's ``recipes`` (``<out>/nnunetv2/nnunetv2/fold<k>``),
with the settings of the sweep file's ``nnunetv2:`` block; its nnU-Net folders live in the run's folder and
are wiped when an unfinished run starts again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from segresmamba.bench import nnunetv2 as external
from segresmamba.bench.configs import instantiate_datamodule, merge, read_yaml, stack_configs
from segresmamba.bench.paper import calculator_co2_kg
from segresmamba.bench.project import model_config, project_root, resolve
from segresmamba.bench.workers import device_env, run_on_devices, threads_per_process
from segresmamba.data.spec import get_dataset_spec
from segresmamba.errors import InputError, command_line, plain_message
from segresmamba.recipes import list_recipes
from segresmamba.registry import check_patch, list_models

__all__ = ["Sweep", "Run", "SweepInterrupted", "run_sweep", "run_command", "resolve_gpus", "prepare_data"]


@dataclass
class Sweep:
    """A sweep file (see the module docstring and ``configs/bench/*.yaml``).

    Attributes:
        name: the sweep's name (the folder of its logs under ``runs_dir``).
        dataset: the benchmark dataset (:func:`segresmamba.data.spec.get_dataset_spec`).
        config: ``-c`` files every run stacks first (trainer and data configs), relative to the project.
        models, folds, recipes: the runs are every recipe x model x fold.
        out: where the results go (``<out>/<recipe>/<model>/fold<k>/metrics.json``), relative to the project.
        protocol: one line saying what the sweep runs, for table headers.
        phantom: ``{kind, out, **writer arguments}`` of a synthetic set written on first use (quick profiles).
        runs_dir: where logs and checkpoints of each run go, relative to the project.
        nnunetv2: settings of the external baseline ``nnunetv2``
            (:class:`segresmamba.bench.nnunetv2.NNUNetSettings`), when ``models`` names it.
        fit: every other key of the file: ``segresmamba fit`` settings (``trainer``, ``model``, ``data``, ...).
        file: the sweep file it was read from (named in its error messages), if any.
    """

    name: str
    dataset: str
    config: list[str]
    models: list[str]
    folds: list[int]
    out: str
    recipes: list[str] = field(default_factory=lambda: ["paper"])
    protocol: str = ""
    phantom: dict[str, Any] | None = None
    runs_dir: str = "runs"
    nnunetv2: dict[str, Any] | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None

    REQUIRED = ("name", "dataset", "config", "models", "folds", "out")

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file; InputError naming the file (and the line of a YAML syntax error)
        and the key at fault."""
        path = Path(path)
        raw = read_yaml(path, "sweep file") or {}
        if not isinstance(raw, dict):
            raise InputError(f"sweep file {path}: expected a mapping of settings")
        missing = [k for k in cls.REQUIRED if k not in raw]
        if missing:
            raise InputError(f"sweep file {path}: missing keys {missing}")
        own = {f.name for f in fields(cls)} - {"fit", "file"}
        sweep = cls(**{k: v for k, v in raw.items() if k in own}, fit={k: v for k, v in raw.items() if k not in own}, file=path)
        sweep.check()
        return sweep

    def where(self) -> str:
        """How messages name the sweep: its file, else its name."""
        return f"sweep file {self.file}" if self.file else f"sweep {self.name!r}"

    def check(self) -> None:
        """Models, folds and recipes named and known (one name may stand alone: ``models: unet``); the
        dataset known; no run-owned setting given. InputError naming the sweep file and the key."""
        try:
            get_dataset_spec(self.dataset)
            self.nnunet_settings()
        except ValueError as err:
            raise InputError(f"{self.where()}: {err}") from None
        for key in ("config", "models", "folds", "recipes"):
            if isinstance(getattr(self, key), (str, int)):
                setattr(self, key, [getattr(self, key)])
            if not isinstance(getattr(self, key), list) or not getattr(self, key):
                raise InputError(f"{self.where()}: {key} must be a name or a non-empty list, got {getattr(self, key)!r}")
        unknown = [m for m in self.models if m not in list_models() and m not in external.EXTERNAL_MODELS]
        if unknown:
            raise InputError(f"{self.where()}: unknown model(s) {unknown}; known: {', '.join([*list_models(), *external.EXTERNAL_MODELS])}")
        bad = [r for r in self.recipes if r not in list_recipes()]
        if bad:
            raise InputError(f"{self.where()}: unknown recipe(s) {bad}; known: {', '.join(list_recipes())}")
        if any(not isinstance(f, int) or isinstance(f, bool) or f < 0 for f in self.folds):
            raise InputError(f"{self.where()}: folds must be fold numbers (0, 1, ...), got {self.folds}")
        if "recipe" in ((self.fit.get("data") or {}).get("init_args") or {}):
            raise InputError(f"{self.where()}: data.init_args.recipe is set by the sweep's `recipes` list, not by hand")
        for key in ("run_record", "test_after_fit"):
            if key in self.fit:
                raise InputError(f"{self.where()}: {key!r} is set by the sweep for each run, not in the sweep file")

    def nnunet_settings(self) -> external.NNUNetSettings:
        """The ``nnunetv2:`` block as settings (ValueError naming a bad one)."""
        return external.NNUNetSettings.from_dict(self.nnunetv2)

    def runs(self) -> list[Run]:
        """Every recipe x model x fold; an external baseline once per fold, under its own recipe."""
        runs = [Run(r, m, f) for r in self.recipes for m in self.models if m not in external.EXTERNAL_MODELS for f in self.folds]
        return runs + [Run(external.RECIPE, m, f) for m in self.models if m in external.EXTERNAL_MODELS for f in self.folds]

    def data_settings(self) -> dict[str, Any]:
        """The ``data:`` block a run sees: the stacked ``config`` files, then the sweep's ``data:`` block."""
        stacked = stack_configs([resolve(c) for c in self.config])
        return merge(stacked.get("data") or {}, self.fit.get("data") or {})

    def patch(self) -> tuple[int, int, int]:
        size = (self.data_settings().get("init_args") or {}).get("patch_size", 128)
        return (size,) * 3 if isinstance(size, int) else tuple(size)

    def uses_gpu(self) -> bool:
        """Whether the stacked trainer settings put the runs on a GPU."""
        stacked = merge(stack_configs([resolve(c) for c in self.config]), {"trainer": self.fit.get("trainer") or {}})
        return str((stacked.get("trainer") or {}).get("accelerator")) in ("gpu", "cuda")


@dataclass(frozen=True)
class Run:
    """One run of a sweep."""

    recipe: str
    model: str
    fold: int

    def path(self) -> Path:
        return Path(self.recipe) / self.model / f"fold{self.fold}"

    def text(self) -> str:
        return f"{self.model} [{self.recipe}] fold {self.fold}"


def prepare_data(sweep: Sweep, data_root: str | None) -> dict:
    """Write the phantom if the sweep uses one and it is missing; validate every case; return the data
    settings the runs get (``init_args`` overrides) and the data's summary."""
    overrides: dict[str, Any] = {}
    if data_root:
        overrides["root"] = data_root
    elif sweep.phantom:
        from segresmamba.data import write_phantoms

        spec = dict(sweep.phantom)
        kind, out = spec.pop("kind"), resolve(spec.pop("out"))
        if not (out / "PHANTOM.json").exists():
            print(f"writing {kind} phantom to {out}", flush=True)
            getattr(write_phantoms, f"write_{kind}_phantom")(out, **spec)
        overrides["root"] = str(out)
    block = sweep.data_settings()
    init = {**(block.get("init_args") or {}), **overrides}
    if isinstance(init.get("root"), str):
        init["root"] = str(resolve(init["root"]))
        overrides["root"] = init["root"]
    summary = instantiate_datamodule({"class_path": block.get("class_path"), "init_args": init}).validate()
    return {"overrides": overrides, "has_fold": "fold" in init, "summary": summary}


def run_config(sweep: Sweep, run: Run, run_dir: Path, record: Path, data: dict) -> dict[str, Any]:
    """The run's own ``-c`` file: the sweep file's CLI settings with the fold, log folder and record path."""
    cfg = merge(sweep.fit, {
        "trainer": {
            "default_root_dir": str(run_dir),
            "logger": {"init_args": {"save_dir": str(run_dir), "name": "fit"}},
        },
        "run_record": str(record),
        "test_after_fit": True,
    })
    init = run_data_overrides(run, data)
    if init:
        cfg = merge(cfg, {"data": {"init_args": init}})
    if model_config(run.model) is None:
        cfg = merge(cfg, {"model": {"net": run.model}})
    return cfg


def run_data_overrides(run: Run, data: dict) -> dict[str, Any]:
    """The ``data.init_args`` a run sets over the sweep's: the data root, and the fold where the data has folds."""
    init = dict(data["overrides"])
    if data["has_fold"]:
        init["fold"] = run.fold
    return init


def external_run_files(sweep: Sweep, run: Run, runs_root: Path, data: dict) -> tuple[Path, Path, Path, list[str]]:
    """(run folder, record, run file, command) of an external baseline's run (see :mod:`segresmamba.bench.nnunetv2`)."""
    run_dir = runs_root / run.path()
    stacked = merge(stack_configs([resolve(c) for c in sweep.config]), sweep.fit)
    spec = run_dir / "nnunetv2_run.json"
    block = merge(sweep.data_settings(), {"init_args": run_data_overrides(run, data)})
    command = external.write_run_spec(spec, block, sweep.nnunet_settings(), run_dir / "record.json", external.energy_settings(stacked))
    return run_dir, run_dir / "record.json", spec, command


def run_command(sweep: Sweep, run: Run, config_file: Path) -> list[str]:
    """``segresmamba fit -c <config...> -c <model yaml> -c <recipe yaml> -c <run.yaml>``."""
    cmd = [sys.executable, "-m", "segresmamba", "fit"]
    for cfg in sweep.config:
        cmd += ["-c", str(resolve(cfg))]
    model_cfg = model_config(run.model)
    if model_cfg is not None:
        cmd += ["-c", str(model_cfg)]
    recipe_cfg = resolve(Path("configs") / "recipe" / f"{run.recipe}.yaml")
    if not recipe_cfg.is_file():
        raise InputError(f"recipe {run.recipe!r} has no config file {recipe_cfg}")
    return cmd + ["-c", str(recipe_cfg), "-c", str(config_file)]


def _write_run_config(sweep: Sweep, run: Run, runs_root: Path, data: dict) -> tuple[Path, Path, Path]:
    run_dir = runs_root / run.path()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "record.json"
    config_file = run_dir / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(sweep, run, run_dir, record, data), sort_keys=False))
    return run_dir, record, config_file


def check_settings(sweep: Sweep, runs: Sequence[Run], runs_root: Path, data: dict) -> None:
    """Before the first run: build the data module of each run's fold (not set up), and parse the full command
    of each run of ours (``segresmamba fit -c ...``) with the CLI's own parser, built once, options never
    abbreviated. A fold the data cannot take, or a bad key or value in the trainer, model or data settings,
    stops the sweep naming the sweep file, the run and the setting, instead of failing every run. The run
    files parsed here are scratch copies; nothing is written under the sweep's folders."""
    from segresmamba.cli import cli_parser

    block = sweep.data_settings()
    for run in {run.fold: run for run in runs}.values() if data["has_fold"] else []:
        try:
            instantiate_datamodule(merge(block, {"init_args": run_data_overrides(run, data)}))
        except InputError as err:
            raise InputError(f"{sweep.where()}: fold {run.fold}: {err}") from None
    parser = cli_parser()
    with tempfile.TemporaryDirectory(prefix="segresmamba-sweep-check-") as scratch:
        for run in [run for run in runs if run.model not in external.EXTERNAL_MODELS]:
            run_dir = runs_root / run.path()
            config_file = Path(scratch) / f"{run.recipe}-{run.model}-fold{run.fold}.yaml"
            config_file.write_text(yaml.safe_dump(run_config(sweep, run, run_dir, run_dir / "record.json", data), sort_keys=False))
            command = run_command(sweep, run, config_file)
            try:
                parser.parse_args(command[command.index("fit"):])
            except (argparse.ArgumentError, ValueError) as err:
                raise InputError(
                    f"{sweep.where()}: {run.text()}: {plain_message(err)} (its settings, stacked on {', '.join(sweep.config)})"
                ) from None


class SweepInterrupted(Exception):
    """SIGINT or SIGTERM stopped the sweep; the runs in flight are recorded as interrupted."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _kill_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):  # the group has ended
        pass


class Stopper:
    """The processes of a sweep's runs, and how SIGINT and SIGTERM stop them.

    Each run's process starts in a session, so a process group, of its own: Ctrl-C in a terminal reaches
    the sweep alone, and the sweep ends each run's whole group (the run, its DataLoader workers, anything
    they started): SIGTERM first, SIGKILL after ``grace_s`` or at a second signal. Once a signal came no run
    starts. A run's group is also killed when the run ends, so nothing it left behind outlives it.
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self._lock = threading.RLock()
        self._running: set[subprocess.Popen] = set()

    def start(self, command: list[str], **popen: Any) -> subprocess.Popen | None:
        """The run's process, or None once a stop was asked for."""
        with self._lock:
            if self.signum is not None:
                return None
            proc = subprocess.Popen(command, start_new_session=True, **popen)
            self._running.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        """The run's exit status, once it ended and its process group with it."""
        try:
            return proc.wait()
        finally:
            _kill_group(proc.pid, signal.SIGKILL)
            with self._lock:
                self._running.discard(proc)

    def stop(self, signum: int, frame: Any = None) -> None:
        """The signal handler: no new run, the running ones asked to end (killed at a second signal)."""
        first = self.signum is None
        self.signum = self.signum or signum
        with self._lock:
            running = [proc.pid for proc in self._running]
        for group in running:
            _kill_group(group, signal.SIGTERM if first else signal.SIGKILL)
        if first and running:
            timer = threading.Timer(self.grace_s, lambda: [_kill_group(g, signal.SIGKILL) for g in running])
            timer.daemon = True
            timer.start()

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM go to :meth:`stop` inside the block (in the main thread; elsewhere Python
        takes no signal handler, and the caller's handling stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self.stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _write_record(out_dir: Path, run: Run, record: dict) -> None:
    """``<out>/<run>/metrics.json``, replaced in one step (a reader never sees half a record)."""
    result_dir = out_dir / run.path()
    result_dir.mkdir(parents=True, exist_ok=True)
    tmp = result_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(result_dir / "metrics.json")


def execute_run(
    sweep: Sweep, run: Run, out_dir: Path, runs_root: Path, data: dict, gpu: str | None, log_to_file: bool,
    cpu_threads: int | None = None, stopper: Stopper | None = None,
) -> dict | None:
    """Fit then test one run; returns the final record (also written to ``<out>/<run>/metrics.json``), or
    None when ``stopper`` was stopped before the run started.

    ``cpu_threads`` caps the run's intra-op CPU threads (OMP_NUM_THREADS) unless the caller's environment sets it.
    A run stopped by a signal through ``stopper`` is recorded with ``status: interrupted``.
    """
    stopper = stopper or Stopper()
    if stopper.signum is not None:
        return None
    if run.model in external.EXTERNAL_MODELS:
        run_dir, record_path, config_file, command = external_run_files(sweep, run, runs_root, data)
    else:
        run_dir, record_path, config_file = _write_run_config(sweep, run, runs_root, data)
        command = run_command(sweep, run, config_file)
    record_path.unlink(missing_ok=True)
    env = device_env(gpu, cpu_threads, base={**os.environ, "PYTHONWARNINGS": "ignore"})
    t0 = time.perf_counter()
    status, error = "ok", None
    log = run_dir / "fit.log"
    with open(log, "w") as fh:
        proc = stopper.start(
            command, cwd=project_root(), env=env,
            stdout=fh if log_to_file else None, stderr=subprocess.STDOUT if log_to_file else fh,
        )
        if proc is None:
            return None
        returncode = stopper.wait(proc)
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if stopper.signum is not None and not (returncode == 0 and record.get("test")):
        status, error = "interrupted", f"stopped by {signal.Signals(stopper.signum).name}"
    elif returncode != 0:
        tail = log.read_text()[-4000:].strip()
        status = "error"
        if "OutOfMemoryError" in tail or "out of memory" in tail:
            error = "CUDA out of memory"
        else:
            error = tail.splitlines()[-1] if tail else f"exit code {returncode}"
    elif not record.get("test"):
        status, error = "error", "fit finished but no test result was recorded"
    record.update({
        "sweep": sweep.name, "protocol": sweep.protocol, "dataset_spec": sweep.dataset, "model": run.model,
        "recipe": record.get("recipe") or run.recipe, "fold": run.fold, "status": status, "error": error,
        "run_wall_time_s": time.perf_counter() - t0, "run_dir": str(run_dir), "run_config": str(config_file),
        "data_summary": data["summary"], "cpu_threads": env.get("OMP_NUM_THREADS"),
    })
    fit = record.get("fit") or {}
    if fit.get("wall_time_s"):
        record["paper_calculator_co2_kg"] = calculator_co2_kg(fit["wall_time_s"] / 3600)
    _write_record(out_dir, run, record)
    return record


def resolve_gpus(spec: str | Sequence[str] | None, sweep: Sweep) -> list[str | None]:
    """GPU ids the runs are spread over, one run per GPU at a time.

    ``"0,1"`` names them (as CUDA_VISIBLE_DEVICES values); without it a GPU sweep takes every GPU
    this process sees (``CUDA_VISIBLE_DEVICES`` respected) and a CPU sweep runs one run at a time.
    """
    if spec:
        return [g.strip() for g in (spec.split(",") if isinstance(spec, str) else spec) if str(g).strip()]
    if not sweep.uses_gpu():
        return [None]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return [None]  # the runs themselves then fail with the CLI's "no GPU" message
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _run_submitit(
    todo: list[Run], sweep: Sweep, out_dir: Path, runs_root: Path, data: dict, submitit_options: dict, stopper: Stopper
) -> Iterator[tuple[Run, dict]]:
    """One job per run through submitit: SLURM where ``sbatch`` exists, else submitit's local executor.

    Each job runs :func:`execute_run`, which writes the run's metrics.json on the shared file system,
    so the same skip-finished-runs logic collects the results and resumes a sweep. A job that dies
    without writing (killed, node failure) becomes an error row here; a signal to the sweep cancels the
    jobs not yet done and records them as interrupted.
    """
    try:
        import submitit
    except ImportError:
        raise InputError("launcher 'submitit' needs submitit: pip install -e '.[slurm]'") from None
    opts = dict(submitit_options)
    folder = Path(opts.pop("folder", None) or runs_root / "submitit")
    cpus = opts.get("cpus_per_task", 8)
    partition = opts.pop("slurm_partition", None)
    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(name=f"segresmamba-{sweep.name}", **opts, **({"slurm_partition": partition} if partition else {}))
    print(f"submitit: {executor.cluster} executor, job folder {folder}", flush=True)
    pending = {executor.submit(execute_run, sweep, run, out_dir, runs_root, data, None, True, cpus): run for run in todo}
    while pending:
        if stopper.signum is not None:
            for job, run in pending.items():
                job.cancel(check=False)
                rec = {"model": run.model, "recipe": run.recipe, "fold": run.fold, "status": "interrupted",
                       "error": f"job {job.job_id} cancelled: sweep stopped by {signal.Signals(stopper.signum).name}"}
                _write_record(out_dir, run, rec)
                yield run, rec
            return
        for job in [j for j in pending if j.done()]:
            run = pending.pop(job)
            try:
                yield run, job.result()
            except Exception as err:  # the job itself died: record it like any failed run
                rec = {"model": run.model, "recipe": run.recipe, "fold": run.fold, "status": "error",
                       "error": f"job {job.job_id}: {type(err).__name__}: {err}"}
                _write_record(out_dir, run, rec)
                yield run, rec
        time.sleep(1)


def run_statuses(sweep: Sweep, out_dir: Path) -> dict[Run, str | None]:
    """Each run's recorded status (``ok``, ``error``, ``interrupted``), or None where it has no record."""
    statuses: dict[Run, str | None] = {}
    for run in sweep.runs():
        done = out_dir / run.path() / "metrics.json"
        statuses[run] = json.loads(done.read_text()).get("status", "ok") if done.exists() else None
    return statuses


def run_sweep(
    sweep: Sweep | str | Path,
    *,
    data_root: str | None = None,
    out: str | Path | None = None,
    models: Sequence[str] | None = None,
    recipes: Sequence[str] | None = None,
    gpus: str | Sequence[str] | None = None,
    retry_failed: bool = False,
    runs_dir: str | Path | None = None,
    verbose: bool = False,
    launcher: str = "local",
    submitit_options: dict | None = None,
) -> list[dict]:
    """Run every recipe x model x fold of a sweep that has no finished record yet; return the records of
    the runs it ran (the skipped ones are on disk).

    Args:
        sweep: a :class:`Sweep` or the path of a sweep file.
        data_root: the real data folder (replaces the data config's root and any phantom).
        out: results folder (default: the sweep's ``out``), relative to the project.
        models, recipes: subsets of (or, for recipes, replacements for) the sweep's lists.
        gpus: GPU ids to spread runs over, one run per GPU (default for a GPU sweep: every visible GPU).
        retry_failed: rerun runs whose metrics.json says error (interrupted runs are always run again).
        runs_dir: where run logs and checkpoints go (default: the sweep's ``runs_dir``); a fast local disk
            keeps checkpoint writes out of short runs' wall time.
        verbose: show each run's Lightning output instead of logging it to ``fit.log``.
        launcher: ``local`` (this machine, ``gpus``) or ``submitit`` (one SLURM job per run; submitit's
            local executor without SLURM) with ``submitit_options`` (submitit's ``update_parameters``
            arguments plus ``folder``).

    Raises:
        InputError: a bad sweep file, a patch a model cannot take, settings the CLI refuses or data that
            fails validation, all before the first run.
        SweepInterrupted: SIGINT or SIGTERM (in the main thread) stopped the runs; those in flight are
            recorded as interrupted, and the next call runs them again.
    """
    if not isinstance(sweep, Sweep):
        sweep = Sweep.load(sweep)
    if models:
        sweep.models = list(models)
    if recipes:
        sweep.recipes = list(recipes)
    if runs_dir:
        sweep.runs_dir = str(runs_dir)
    sweep.check()
    if launcher not in ("local", "submitit"):
        raise InputError(f"launcher must be 'local' or 'submitit', got {launcher!r}")
    patch = sweep.patch()
    bad = []
    for model in [m for m in sweep.models if m not in external.EXTERNAL_MODELS]:  # nnU-Net plans its own patch
        try:
            check_patch(model, patch)
        except ValueError as err:
            bad.append(str(err))
    if bad:
        raise InputError(f"{sweep.where()}: patch check failed before training:\n  " + "\n  ".join(bad))
    out_dir = resolve(out or sweep.out)
    runs_root = resolve(sweep.runs_dir) / sweep.name
    try:
        data = prepare_data(sweep, data_root)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"{sweep.where()}: data check failed before training: {err}") from None
    print(f"data: {data['summary'].get('dataset')} ({data['summary'].get('provenance')}), validated", flush=True)

    todo = []
    for run, status in run_statuses(sweep, out_dir).items():
        if status == "ok" or (status == "error" and not retry_failed):
            print(f"skip {run.text()}: finished ({status})", flush=True)
            continue
        if status == "interrupted":
            print(f"run {run.text()} again: it was interrupted", flush=True)
        todo.append(run)
    if not todo:
        print(f"results in {out_dir}", flush=True)
        return []
    check_settings(sweep, todo, runs_root, data)
    if any(run.model in external.EXTERNAL_MODELS for run in todo):
        try:
            external.preflight(merge(sweep.data_settings(), {"init_args": run_data_overrides(todo[-1], data)}), sweep.nnunet_settings())
        except ValueError as err:
            raise InputError(f"{sweep.where()}: {err}") from None
    stopper = Stopper()
    if launcher == "submitit":
        runner = _run_submitit(todo, sweep, out_dir, runs_root, data, submitit_options or {}, stopper)
    else:
        devices = resolve_gpus(gpus, sweep)
        if devices != [None]:
            print(f"spreading runs over GPU(s) {','.join(devices)}", flush=True)
        threads = threads_per_process(len(devices))
        runner = run_on_devices(
            lambda run, gpu: execute_run(sweep, run, out_dir, runs_root, data, gpu, log_to_file=not verbose,
                                         cpu_threads=threads, stopper=stopper),
            todo, devices,
        )
    records = []
    started = time.perf_counter()
    with stopper.handling_signals():
        for run, rec in runner:
            if rec is None:  # not started: the sweep was stopped
                continue
            records.append(rec)
            eta = (time.perf_counter() - started) / len(records) * (len(todo) - len(records))
            dice = (rec.get("test") or {}).get("test/dice_mean")
            shown = f"test Dice {dice:.3f}" if isinstance(dice, float) else (rec.get("error") or "")
            print(f"[{len(records)}/{len(todo)}] {run.text()}: {rec['status']} {shown} "
                  f"({rec.get('run_wall_time_s', 0):.0f} s; ETA {eta / 60:.1f} min)", flush=True)
    if stopper.signum is not None:
        stopped = [r for r in records if r["status"] == "interrupted"]
        print(f"{SweepInterrupted(stopper.signum)}: {len(stopped)} run(s) in flight recorded as interrupted, "
              f"{len(todo) - len(records)} not started; run the sweep again to finish them (finished runs are kept)", flush=True)
        raise SweepInterrupted(stopper.signum)
    print(f"results in {out_dir}", flush=True)
    return records


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Run a benchmark sweep (see the module docstring).", allow_abbrev=False)
    p.add_argument("sweep", help="sweep file, e.g. configs/bench/brats_quick.yaml")
    p.add_argument("--data-root", default=None, help="real data directory (replaces the config's root and any phantom)")
    p.add_argument("--out", default=None, help="results directory (default: the sweep's `out`)")
    p.add_argument("--models", nargs="+", default=None, help="subset of the sweep's models")
    p.add_argument("--recipes", nargs="+", default=None, help="recipes to run (default: the sweep's `recipes`)")
    p.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids to spread runs over, one per GPU (default for a GPU sweep: every visible GPU)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs whose metrics.json says error")
    p.add_argument("--runs-dir", default=None,
                   help="where run logs and checkpoints go (default: the sweep's runs_dir, runs/); a fast local disk or "
                        "/dev/shm keeps checkpoint writes out of short runs' wall time")
    p.add_argument("--verbose", action="store_true", help="show each run's Lightning output instead of logging it")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local: this machine (--gpus); submitit: one SLURM job per run (local executor without SLURM)")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--gpus-per-job", type=int, default=1)
    p.add_argument("--cpus-per-job", type=int, default=8)
    p.add_argument("--mem-gb", type=int, default=64)
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--submitit-folder", default=None, help="job logs and pickles (default: <runs_dir>/<sweep>/submitit)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too (or SEGRESMAMBA_DEBUG=1)")
    args = p.parse_args(argv)
    submitit_options = {
        "timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_job, "cpus_per_task": args.cpus_per_job,
        "mem_gb": args.mem_gb, "slurm_partition": args.slurm_partition, "folder": args.submitit_folder,
    }
    sweep = Sweep.load(args.sweep)
    try:
        run_sweep(
            sweep, data_root=args.data_root, out=args.out, models=args.models, recipes=args.recipes, gpus=args.gpus,
            retry_failed=args.retry_failed, runs_dir=args.runs_dir, verbose=args.verbose, launcher=args.launcher,
            submitit_options=submitit_options,
        )
    except SweepInterrupted as stop:
        return 128 + stop.signum
    out_dir = resolve(args.out or sweep.out)
    failed = [f"{run.text()} ({status})" for run, status in run_statuses(sweep, out_dir).items() if status != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(sweep.runs())} runs did not finish: {', '.join(failed)}; their metrics.json "
              f"under {out_dir} say why (--retry-failed runs the failed ones again)", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m segresmamba.bench.sweep``: exit status 0 when every run finished, 1 when one failed, 2 for
    bad input (one line naming the file or setting), 128 + the signal number when stopped by a signal."""
    return command_line(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
