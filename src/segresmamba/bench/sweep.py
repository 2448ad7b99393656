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

Before the first run: every model's patch is checked against its registry facts, the stacked settings are
parsed by the CLI itself (``--print_config``), and the data is validated; any failure stops the sweep with
a message naming the setting or file. Resumable and idempotent: a run whose ``metrics.json`` exists is
skipped (``retry_failed`` reruns the failed ones); a crash or out-of-memory becomes a row with ``status:
error`` and the sweep goes on.

External baselines: ``nnunetv2`` in ``models`` is nnU-Net v2 run as nnU-Net (:mod:`segresmamba.bench.nnunetv2`),
once per fold under the recipe ``nnunetv2`` whatever the sweep's ``recipes`` (``<out>/nnunetv2/nnunetv2/fold<k>``),
with the settings of the sweep file's ``nnunetv2:`` block; its nnU-Net folders live in the run's folder and
are wiped when an unfinished run starts again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from segresmamba.bench import nnunetv2 as external
from segresmamba.bench.configs import instantiate_datamodule, merge, stack_configs
from segresmamba.bench.paper import calculator_co2_kg
from segresmamba.bench.project import model_config, project_root, resolve
from segresmamba.bench.workers import device_env, run_on_devices, threads_per_process
from segresmamba.data.spec import get_dataset_spec
from segresmamba.recipes import list_recipes
from segresmamba.registry import check_patch, list_models

__all__ = ["Sweep", "Run", "run_sweep", "run_command", "resolve_gpus", "prepare_data"]


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

    REQUIRED = ("name", "dataset", "config", "models", "folds", "out")

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file; ValueError naming the file and the key at fault."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"sweep file {path} not found (see configs/bench/)")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        missing = [k for k in cls.REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        own = {f.name for f in fields(cls)} - {"fit"}
        sweep = cls(**{k: v for k, v in raw.items() if k in own}, fit={k: v for k, v in raw.items() if k not in own})
        try:
            sweep.check()
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return sweep

    def check(self) -> None:
        """Models, folds and recipes named and known; the dataset known; no run-owned setting given."""
        get_dataset_spec(self.dataset)
        if isinstance(self.config, str):
            self.config = [self.config]
        for key in ("models", "folds", "recipes"):
            if not isinstance(getattr(self, key), list) or not getattr(self, key):
                raise ValueError(f"{key} must be a non-empty list")
        unknown = [m for m in self.models if m not in list_models() and m not in external.EXTERNAL_MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {', '.join([*list_models(), *external.EXTERNAL_MODELS])}")
        self.nnunet_settings()
        bad = [r for r in self.recipes if r not in list_recipes()]
        if bad:
            raise ValueError(f"unknown recipe(s) {bad}; known: {', '.join(list_recipes())}")
        if "recipe" in ((self.fit.get("data") or {}).get("init_args") or {}):
            raise ValueError("data.init_args.recipe is set by the sweep's `recipes` list, not by hand")
        for key in ("run_record", "test_after_fit"):
            if key in self.fit:
                raise ValueError(f"{key!r} is set by the sweep for each run, not in the sweep file")

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
        raise ValueError(f"recipe {run.recipe!r} has no config file {recipe_cfg}")
    return cmd + ["-c", str(recipe_cfg), "-c", str(config_file)]


def _write_run_config(sweep: Sweep, run: Run, runs_root: Path, data: dict) -> tuple[Path, Path, Path]:
    run_dir = runs_root / run.path()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "record.json"
    config_file = run_dir / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(sweep, run, run_dir, record, data), sort_keys=False))
    return run_dir, record, config_file


def check_settings(sweep: Sweep, run: Run, runs_root: Path, data: dict) -> None:
    """Let the CLI parse the first run's stacked settings (``--print_config``): a bad key or value stops the
    sweep here, with the CLI's own message, instead of failing every run."""
    _, _, config_file = _write_run_config(sweep, run, runs_root, data)
    proc = subprocess.run(
        [*run_command(sweep, run, config_file), "--print_config"], cwd=project_root(), capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        raise ValueError(f"the CLI refuses the sweep's settings ({config_file}):\n{proc.stderr.strip()[-3000:]}")


def execute_run(
    sweep: Sweep, run: Run, out_dir: Path, runs_root: Path, data: dict, gpu: str | None, log_to_file: bool,
    cpu_threads: int | None = None,
) -> dict:
    """Fit then test one run; returns the final record (also written to ``<out>/<run>/metrics.json``).

    ``cpu_threads`` caps the run's intra-op CPU threads (OMP_NUM_THREADS) unless the caller's environment sets it.
    """
    result_dir = out_dir / run.path()
    result_dir.mkdir(parents=True, exist_ok=True)
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
        proc = subprocess.run(
            command, cwd=project_root(), env=env,
            stdout=fh if log_to_file else None, stderr=subprocess.STDOUT if log_to_file else fh,
        )
    if proc.returncode != 0:
        tail = log.read_text()[-4000:].strip()
        status = "error"
        if "OutOfMemoryError" in tail or "out of memory" in tail:
            error = "CUDA out of memory"
        else:
            error = tail.splitlines()[-1] if tail else f"exit code {proc.returncode}"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if status == "ok" and not record.get("test"):
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
    tmp = result_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(result_dir / "metrics.json")
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


def _run_submitit(todo: list[Run], sweep: Sweep, out_dir: Path, runs_root: Path, data: dict, submitit_options: dict) -> Iterator[tuple[Run, dict]]:
    """One job per run through submitit: SLURM where ``sbatch`` exists, else submitit's local executor.

    Each job runs :func:`execute_run`, which writes the run's metrics.json on the shared file system,
    so the same skip-finished-runs logic collects the results and resumes a sweep. A job that dies
    without writing (killed, node failure) becomes an error row here.
    """
    try:
        import submitit
    except ImportError:
        raise ValueError("launcher 'submitit' needs submitit: pip install -e '.[slurm]'") from None
    opts = dict(submitit_options)
    folder = Path(opts.pop("folder", None) or runs_root / "submitit")
    cpus = opts.get("cpus_per_task", 8)
    partition = opts.pop("slurm_partition", None)
    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(name=f"segresmamba-{sweep.name}", **opts, **({"slurm_partition": partition} if partition else {}))
    print(f"submitit: {executor.cluster} executor, job folder {folder}", flush=True)
    pending = {executor.submit(execute_run, sweep, run, out_dir, runs_root, data, None, True, cpus): run for run in todo}
    while pending:
        for job in [j for j in pending if j.done()]:
            run = pending.pop(job)
            try:
                yield run, job.result()
            except Exception as err:  # the job itself died: record it like any failed run
                rec = {"model": run.model, "recipe": run.recipe, "fold": run.fold, "status": "error",
                       "error": f"job {job.job_id}: {type(err).__name__}: {err}"}
                dest = out_dir / run.path()
                dest.mkdir(parents=True, exist_ok=True)
                (dest / "metrics.json").write_text(json.dumps(rec, indent=2))
                yield run, rec
        time.sleep(1)


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
        retry_failed: rerun runs whose metrics.json says error.
        runs_dir: where run logs and checkpoints go (default: the sweep's ``runs_dir``); a fast local disk
            keeps checkpoint writes out of short runs' wall time.
        verbose: show each run's Lightning output instead of logging it to ``fit.log``.
        launcher: ``local`` (this machine, ``gpus``) or ``submitit`` (one SLURM job per run; submitit's
            local executor without SLURM) with ``submitit_options`` (submitit's ``update_parameters``
            arguments plus ``folder``).

    Raises:
        ValueError: a bad sweep file, a patch a model cannot take, settings the CLI refuses or data that
            fails validation, all before the first run.
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
    patch = sweep.patch()
    bad = []
    for model in [m for m in sweep.models if m not in external.EXTERNAL_MODELS]:  # nnU-Net plans its own patch
        try:
            check_patch(model, patch)
        except ValueError as err:
            bad.append(str(err))
    if bad:
        raise ValueError("patch check failed before training:\n  " + "\n  ".join(bad))
    out_dir = resolve(out or sweep.out)
    runs_root = resolve(sweep.runs_dir) / sweep.name
    try:
        data = prepare_data(sweep, data_root)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"data check failed before training: {err}") from None
    print(f"data: {data['summary'].get('dataset')} ({data['summary'].get('provenance')}), validated", flush=True)

    runs = sweep.runs()
    todo = []
    for run in runs:
        done = out_dir / run.path() / "metrics.json"
        if done.exists():
            status = json.loads(done.read_text()).get("status")
            if status == "ok" or not retry_failed:
                print(f"skip {run.text()}: finished ({status})", flush=True)
                continue
        todo.append(run)
    if not todo:
        print(f"results in {out_dir}", flush=True)
        return []
    ours = [run for run in todo if run.model not in external.EXTERNAL_MODELS]
    if ours:
        check_settings(sweep, ours[0], runs_root, data)
    if len(ours) < len(todo):
        external.preflight(merge(sweep.data_settings(), {"init_args": run_data_overrides(todo[-1], data)}), sweep.nnunet_settings())
    if launcher == "submitit":
        runner = _run_submitit(todo, sweep, out_dir, runs_root, data, submitit_options or {})
    elif launcher == "local":
        devices = resolve_gpus(gpus, sweep)
        if devices != [None]:
            print(f"spreading runs over GPU(s) {','.join(devices)}", flush=True)
        threads = threads_per_process(len(devices))
        runner = run_on_devices(
            lambda run, gpu: execute_run(sweep, run, out_dir, runs_root, data, gpu, log_to_file=not verbose, cpu_threads=threads),
            todo, devices,
        )
    else:
        raise ValueError(f"launcher must be 'local' or 'submitit', got {launcher!r}")
    records = []
    started = time.perf_counter()
    for finished, (run, rec) in enumerate(runner, 1):
        eta = (time.perf_counter() - started) / finished * (len(todo) - finished)
        dice = (rec.get("test") or {}).get("test/dice_mean")
        shown = f"test Dice {dice:.3f}" if isinstance(dice, float) else (rec.get("error") or "")
        print(f"[{finished}/{len(todo)}] {run.text()}: {rec['status']} {shown} "
              f"({rec.get('run_wall_time_s', 0):.0f} s; ETA {eta / 60:.1f} min)", flush=True)
        records.append(rec)
    print(f"results in {out_dir}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a benchmark sweep (see the module docstring).")
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
    args = p.parse_args(argv)
    submitit_options = {
        "timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_job, "cpus_per_task": args.cpus_per_job,
        "mem_gb": args.mem_gb, "slurm_partition": args.slurm_partition, "folder": args.submitit_folder,
    }
    try:
        run_sweep(
            args.sweep, data_root=args.data_root, out=args.out, models=args.models, recipes=args.recipes, gpus=args.gpus,
            retry_failed=args.retry_failed, runs_dir=args.runs_dir, verbose=args.verbose, launcher=args.launcher,
            submitit_options=submitit_options,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
