"""Sweep runner: dataset x model x fold, each run one ``segresmamba fit --test_after_fit true`` (fit, then test
of the best checkpoint, in one process), all through the same CLI as a user's runs.

    python -m segresmamba.bench.sweep configs/bench/quick.yaml
    python -m segresmamba.bench.sweep configs/bench/brats.yaml --data-root /data/BraTS2021 --gpus 0,1

A sweep YAML names the data config and its overrides, the models, the folds, the trainer settings
(epochs or steps, precision) and where results go. Every run writes
``<out>/<model>/fold<k>/metrics.json`` (Dice per class and mean, best and last epoch, wall time,
peak memory, energy and CO2 from codecarbon, the paper's calculator CO2 for the same hours, resolved
config, git SHA, versions, device). Checkpoints and logs stay under ``runs/<sweep>/``.

Resumable and idempotent: a run whose ``metrics.json`` exists is skipped (``--retry-failed`` reruns
the failed ones); a crash or out-of-memory becomes a row with ``status: error`` and the sweep goes on.
The data is validated before the first run, so a missing or malformed data directory stops the sweep
before any training.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segresmamba.bench.paper import calculator_co2_kg

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Sweep:
    """A parsed sweep YAML (see ``configs/bench/*.yaml``)."""

    name: str
    data_config: str
    models: list[str]
    folds: list[int]
    out: str
    trainer_configs: list[str] = field(default_factory=lambda: ["configs/trainer/cpu.yaml"])
    data_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    trainer_args: dict[str, Any] = field(default_factory=dict)
    phantom: dict[str, Any] | None = None
    energy_country: str | None = "DEU"
    protocol: str = ""
    runs_dir: str = "runs"  # logs and checkpoints of each run (results go to `out`); relative to the repo

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"error: sweep file {path} not found (see configs/bench/)")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise SystemExit(f"error: {path}: unknown keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        missing = [k for k in ("name", "data_config", "models", "folds", "out") if k not in raw]
        if missing:
            raise SystemExit(f"error: {path}: missing keys {missing}")
        sweep = cls(**raw)
        if not sweep.models or not sweep.folds:
            raise SystemExit(f"error: {path}: models and folds must not be empty")
        return sweep


def _flags(prefix: str, values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{prefix}.{key}", json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)]
    return out


def prepare_data(sweep: Sweep, data_root: str | None) -> dict:
    """Write the phantom if the sweep uses one and it is missing; validate every case; return the summary."""
    import segresmamba.data  # noqa: F401  (registers the data module classes for instantiation)
    from jsonargparse import ArgumentParser

    from segresmamba.data.base import VolumeDataModule

    if sweep.phantom and not data_root:
        from segresmamba.data import write_phantoms

        spec = dict(sweep.phantom)
        kind, out = spec.pop("kind"), ROOT / spec.pop("out")
        if not (out / "PHANTOM.json").exists():
            print(f"writing {kind} phantom to {out}", flush=True)
            getattr(write_phantoms, f"write_{kind}_phantom")(out, **spec)
    parser = ArgumentParser()
    parser.add_subclass_arguments(VolumeDataModule, "data")
    cfg_file = yaml.safe_load((ROOT / sweep.data_config).read_text())
    init_args = {**cfg_file["data"].get("init_args", {}), **sweep.data_args}
    if data_root:
        init_args["root"] = data_root
    elif "root" in init_args and not Path(init_args["root"]).is_absolute():
        init_args["root"] = str(ROOT / init_args["root"])
    cfg = parser.parse_object({"data": {"class_path": cfg_file["data"]["class_path"], "init_args": init_args}})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    datamodule = instantiate(cfg).data
    summary = datamodule.validate()
    return {"init_args": init_args, "summary": summary}


def run_command(sweep: Sweep, model: str, fold: int, run_dir: Path, record: Path, data_init: dict) -> list[str]:
    """``segresmamba fit ... --test_after_fit true``: fit, then test the best checkpoint, in one process."""
    cmd = [sys.executable, "-m", "segresmamba", "fit"]
    for cfg in sweep.trainer_configs:
        cmd += ["-c", str(ROOT / cfg)]
    model_cfg = ROOT / "configs" / "model" / f"{model}.yaml"
    cmd += ["-c", str(model_cfg)] if model_cfg.exists() else ["--model.net", model]
    cmd += ["-c", str(ROOT / sweep.data_config)]
    data_args = dict(data_init)
    if "fold" in data_args:
        data_args["fold"] = fold
    cmd += _flags("data.init_args", data_args)
    cmd += _flags("model", sweep.model_args)
    # the sanity check scores the whole validation set before training (the untrained floor of the record);
    # only the best checkpoint is tested, so no last.ckpt and no optimizer state: at 68 M parameters a full
    # checkpoint is 0.8 GB, and writing two per epoch cost more than the training steps of a short GPU run
    cmd += ["--trainer.num_sanity_val_steps", "-1", "--checkpoint_save_last", "false", "--checkpoint_weights_only", "true"]
    cmd += _flags("trainer", sweep.trainer_args)
    cmd += [
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.name", "fit",
        "--run_record", str(record),
        "--test_after_fit", "true",
    ]
    if sweep.energy_country:
        cmd += ["--energy_country", sweep.energy_country]
    return cmd


def execute_run(
    sweep: Sweep, model: str, fold: int, out_dir: Path, data: dict, gpu: str | None, log_to_file: bool, cpu_threads: int | None = None,
) -> dict:
    """fit then test one (model, fold); returns the final record (also written to metrics.json).

    ``cpu_threads`` caps the run's intra-op CPU threads (OMP_NUM_THREADS) unless the caller's environment sets
    it: two runs that each start one OpenMP thread per core keep the host busy spinning, and the CPU side of a
    short GPU run (augmentation, metric, kernel launches) then takes longer than its GPU work.
    """
    result_dir = out_dir / model / f"fold{fold}"
    run_dir = ROOT / sweep.runs_dir / sweep.name / model / f"fold{fold}"
    result_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path = run_dir / "record.json"
    record_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if cpu_threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    t0 = time.perf_counter()
    status, error = "ok", None
    log = run_dir / "fit.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            run_command(sweep, model, fold, run_dir, record_path, data["init_args"]), cwd=ROOT, env=env,
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
        "sweep": sweep.name, "protocol": sweep.protocol, "model": model, "fold": fold, "status": status,
        "error": error, "run_wall_time_s": time.perf_counter() - t0, "run_dir": str(run_dir),
        "data_summary": data["summary"], "cpu_threads": env.get("OMP_NUM_THREADS"),
    })
    fit = record.get("fit") or {}
    if fit.get("wall_time_s"):
        record["paper_calculator_co2_kg"] = calculator_co2_kg(fit["wall_time_s"] / 3600)
    tmp = result_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(result_dir / "metrics.json")
    return record


def threads_per_process(parallel: int) -> int:
    """CPU threads each of ``parallel`` processes may use: the cores this process may run on, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // parallel)


def _uses_gpu(sweep: Sweep) -> bool:
    """Whether the sweep's trainer configs put the runs on a GPU."""
    accelerator = None
    for cfg in sweep.trainer_configs:
        raw = yaml.safe_load((ROOT / cfg).read_text()) or {}
        accelerator = (raw.get("trainer") or {}).get("accelerator", accelerator)
    accelerator = (sweep.trainer_args or {}).get("accelerator", accelerator)
    return str(accelerator) in ("gpu", "cuda")


def resolve_gpus(spec: str | None, sweep: Sweep) -> list[str | None]:
    """GPU ids the runs are spread over, one run per GPU at a time.

    ``--gpus 0,1`` names them (as CUDA_VISIBLE_DEVICES values); without it a GPU sweep takes every GPU
    this process sees (``CUDA_VISIBLE_DEVICES`` respected) and a CPU sweep runs one run at a time.
    """
    if spec:
        return [g.strip() for g in spec.split(",") if g.strip()]
    if not _uses_gpu(sweep):
        return [None]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return [None]  # the runs themselves then fail with the CLI's "no GPU" message
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _run_local(todo, sweep: Sweep, out_dir: Path, data: dict, args):
    """Runs on this machine, one at a time per GPU (see :func:`resolve_gpus`), or one at a time on a CPU."""
    gpus = resolve_gpus(args.gpus, sweep)
    if gpus != [None]:
        print(f"spreading runs over GPU(s) {','.join(gpus)}", flush=True)
    threads = threads_per_process(len(gpus))
    free: queue.Queue = queue.Queue()
    for g in gpus:
        free.put(g)

    def one(job):
        gpu = free.get()
        try:
            return execute_run(sweep, *job, out_dir, data, gpu, log_to_file=not args.verbose, cpu_threads=threads)
        finally:
            free.put(gpu)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        futures = {pool.submit(one, job): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def _run_submitit(todo, sweep: Sweep, out_dir: Path, data: dict, args):
    """One job per run through submitit: SLURM where ``sbatch`` exists, else submitit's local executor.

    Each job runs :func:`execute_run`, which writes the run's metrics.json on the shared file system,
    so the same skip-finished-runs logic collects the results and resumes a sweep. A job that dies
    without writing (killed, node failure) becomes an error row here.
    """
    try:
        import submitit
    except ImportError:
        raise SystemExit("error: --launcher submitit needs submitit: pip install -e '.[slurm]'") from None
    folder = Path(args.submitit_folder) if args.submitit_folder else ROOT / sweep.runs_dir / sweep.name / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(
        name=f"segresmamba-{sweep.name}", timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_job,
        cpus_per_task=args.cpus_per_job, mem_gb=args.mem_gb,
        **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {}),
    )
    print(f"submitit: {executor.cluster} executor, job folder {folder}", flush=True)
    jobs = {executor.submit(execute_run, sweep, model, fold, out_dir, data, None, True, args.cpus_per_job): (model, fold)
            for model, fold in todo}
    pending = dict(jobs)
    while pending:
        for job in [j for j in pending if j.done()]:
            model, fold = pending.pop(job)
            try:
                yield (model, fold), job.result()
            except Exception as err:  # the job itself died: record it like any failed run
                rec = {"model": model, "fold": fold, "status": "error", "error": f"job {job.job_id}: {type(err).__name__}: {err}"}
                dest = out_dir / model / f"fold{fold}"
                dest.mkdir(parents=True, exist_ok=True)
                (dest / "metrics.json").write_text(json.dumps(rec, indent=2))
                yield (model, fold), rec
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a benchmark sweep (see module docstring).")
    p.add_argument("sweep", help="sweep YAML, e.g. configs/bench/quick.yaml")
    p.add_argument("--data-root", default=None, help="real data directory (replaces the config's root and any phantom)")
    p.add_argument("--out", default=None, help="results directory (default: the sweep's `out`)")
    p.add_argument("--models", nargs="+", default=None, help="subset of the sweep's models")
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
    p.add_argument("--submitit-folder", default=None, help="job logs and pickles (default: runs/<sweep>/submitit)")
    args = p.parse_args(argv)
    sweep = Sweep.load(args.sweep)
    if args.runs_dir:
        sweep.runs_dir = args.runs_dir
    models = args.models or sweep.models
    import segresmamba

    known = segresmamba.list_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; known: {', '.join(known)}")
    out_dir = Path(args.out or sweep.out)
    out_dir = out_dir if out_dir.is_absolute() else ROOT / out_dir
    try:
        data = prepare_data(sweep, args.data_root)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: data check failed before training: {err}") from None
    print(f"data: {data['summary'].get('dataset')} ({data['summary'].get('provenance')}), validated", flush=True)

    runs = [(m, f) for m in models for f in sweep.folds]
    todo = []
    for model, fold in runs:
        done = out_dir / model / f"fold{fold}" / "metrics.json"
        if done.exists():
            status = json.loads(done.read_text()).get("status")
            if status == "ok" or not args.retry_failed:
                print(f"skip {model} fold {fold}: finished ({status})", flush=True)
                continue
        todo.append((model, fold))
    runner = _run_submitit(todo, sweep, out_dir, data, args) if args.launcher == "submitit" else _run_local(todo, sweep, out_dir, data, args)
    started = time.perf_counter()
    for finished, ((model, fold), rec) in enumerate(runner, 1):
        eta = (time.perf_counter() - started) / finished * (len(todo) - finished)
        dice = (rec.get("test") or {}).get("test/dice_mean")
        shown = f"test Dice {dice:.3f}" if isinstance(dice, float) else (rec.get("error") or "")
        print(f"[{finished}/{len(todo)}] {model} fold {fold}: {rec['status']} {shown} "
              f"({rec.get('run_wall_time_s', 0):.0f} s; ETA {eta / 60:.1f} min)", flush=True)
    print(f"results in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
