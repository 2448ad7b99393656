"""Does data-parallel training give the Dice of one device? One command, one table.

Fits the same model on the same fold several ways through the CLI (``segresmamba fit``):

- on ``--devices`` GPUs with DDP, per-device batch = global batch / devices, seed 0;
- on one device with the global batch, once per seed in ``--seeds``; the spread of those runs is the noise
  a DDP run is judged against (different seeds, different augmentation draws, different sample order).
  With as many GPUs as seeds, these fits run at once, one per GPU.

DDP reshuffles which sample lands in which step (each rank draws its own shard), so equality to the last
digit is not expected; agreement within the seed-to-seed spread (or ``--tolerance``, whichever is larger)
is. Writes ``<out>/ddp.csv`` and ``ddp.md`` with Dice per class, untrained Dice, fit wall time, median
step, peak memory per device and provenance; every run's metrics.json stays beside them.

    python -m perf.ddp_check --devices 2 --out results/ddp/nvidia-h200          # GPUs 0,1
    python -m perf.ddp_check --accelerator cpu --devices 2 ...                   # gloo, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from segresmamba.bench.efficiency import card_slug
from segresmamba.bench.workers import threads_per_process

ROOT = Path(__file__).resolve().parents[1]


def fit_command(args, devices: int, seed: int, run_dir: Path, record: Path) -> list[str]:
    trainer_cfg = "gpu.yaml" if args.accelerator == "gpu" else "cpu.yaml"
    cmd = [
        sys.executable, "-m", "segresmamba", "fit",
        "-c", str(ROOT / "configs" / "trainer" / trainer_cfg),
        "-c", str(ROOT / "configs" / "model" / f"{args.model}.yaml"),
        "-c", str(ROOT / args.data_config),
        "-c", str(ROOT / "configs" / "callbacks" / "sweep.yaml"),
        "--data.init_args.batch_size", str(args.global_batch // devices),
        "--trainer.devices", str(devices),
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.num_sanity_val_steps", "-1",
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.name", record.stem,
        "--seed_everything", str(seed),
        "--run_record", str(record),
    ]
    if args.fold is not None:
        cmd += ["--data.init_args.fold", str(args.fold)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    return cmd + list(args.extra)


def run_fit(cmd: list[str], log: Path, timeout_s: float, env: dict) -> int:
    """Run one fit in its own process group, so a stuck DDP rank dies with its launcher on timeout."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9


def _row(name: str, devices: int, seed: int, global_batch: int, record_path: Path, rc: int, wall: float) -> dict:
    row = {"run": name, "devices": devices, "seed": seed, "global_batch": global_batch, "per_device_batch": global_batch // devices,
           "status": "ok" if rc == 0 and record_path.is_file() else f"failed (exit {rc})", "process_wall_s": wall}
    if not record_path.is_file():
        return row
    rec = json.loads(record_path.read_text())
    fit = rec.get("fit") or {}
    best = fit.get("best") or {}
    row.update({
        "best_val_dice_mean": best.get("val/dice_mean"), "best_epoch": best.get("epoch"),
        "last_val_dice_mean": (fit.get("last") or {}).get("val/dice_mean"),
        "untrained_val_dice_mean": (fit.get("untrained") or {}).get("val/dice_mean"),
        "epochs": fit.get("epochs"), "global_steps": fit.get("global_steps"), "fit_wall_s": fit.get("wall_time_s"),
        "median_step_ms": fit.get("median_step_ms"), "peak_gib_per_device": fit.get("peak_memory_allocated_gib"),
        "model": rec.get("model"), "device": (rec.get("provenance") or {}).get("device"),
        "precision": (rec.get("provenance") or {}).get("precision"), "git_sha": (rec.get("provenance") or {}).get("git_sha"),
        "data": f"{(rec.get('data') or {}).get('dataset')}, {(rec.get('data') or {}).get('provenance')}",
    })
    for key, value in best.items():
        if key.startswith("val/dice_") and key != "val/dice_mean":
            row[key.replace("val/", "best_val_")] = value
    return row


def verdict(table: pd.DataFrame, tolerance: float) -> tuple[str, float, float]:
    """(text, |DDP - one device seed 0|, allowed difference)."""
    ok = table[table.status == "ok"]
    single = ok[ok.devices == 1].set_index("seed").best_val_dice_mean
    multi = ok[ok.devices > 1].best_val_dice_mean
    if single.empty or multi.empty:
        return "not decided: a run failed (see the status column)", float("nan"), float("nan")
    reference = single.iloc[0]
    noise = float(single.max() - single.min()) if len(single) > 1 else 0.0
    allowed = max(noise, tolerance)
    diff = float(abs(multi.iloc[0] - reference))
    same = diff <= allowed
    return (f"{'same' if same else 'DIFFERENT'}: |DDP - one device| = {diff:.4f} "
            f"{'<=' if same else '>'} {allowed:.4f} (max of the seed spread {noise:.4f} and the tolerance {tolerance})"), diff, allowed


def write_tables(table: pd.DataFrame, text: str, args, out: Path) -> None:
    table.to_csv(out / "ddp.csv", index=False)
    ok = table[table.status == "ok"]
    first = ok.iloc[0] if len(ok) else table.iloc[0]
    lines = [
        f"# DDP check: {args.model}, {args.devices} devices vs 1",
        "",
        f"Device: {first.get('device', '?')}. Precision: {first.get('precision', '?')}. git {first.get('git_sha', '?')}. "
        f"Data: {args.data_config}, fold {args.fold if args.fold is not None else '(config)'} ({first.get('data', '?')}). {args.epochs} epochs, global batch {args.global_batch}.",
        "Dice = best validation mean Dice (whole volumes, sliding window; per-case Dice gathered over ranks).",
        "",
        f"**{text}**",
        "",
        "| run | devices | seed | per-device batch | best val Dice | last val Dice | untrained | steps | fit wall (s) | step (ms) | peak GiB / device | status |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]

    def f(v, d=4):
        return "–" if v is None or pd.isna(v) else f"{v:.{d}f}"

    for r in table.to_dict("records"):
        lines.append(
            f"| {r['run']} | {r['devices']} | {r['seed']} | {r['per_device_batch']} | {f(r.get('best_val_dice_mean'))} | "
            f"{f(r.get('last_val_dice_mean'))} | {f(r.get('untrained_val_dice_mean'))} | {r.get('global_steps', '–')} | "
            f"{f(r.get('fit_wall_s'), 1)} | {f(r.get('median_step_ms'), 1)} | {f(r.get('peak_gib_per_device'), 2)} | {r['status']} |"
        )
    (out / "ddp.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="segresmamba")
    p.add_argument("--data-config", default="configs/data/brats_phantom.yaml")
    p.add_argument("--fold", type=int, default=0, help="-1: the data config's own (for data without folds)")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one-device runs; their spread is the noise")
    p.add_argument("--tolerance", type=float, default=0.02, help="smallest allowed Dice difference")
    p.add_argument("--timeout-min", type=float, default=30.0, help="per fit; a stuck run is killed with its ranks")
    p.add_argument("--out", type=Path, default=None, help="default: results/ddp/<card>")
    p.add_argument("extra", nargs="*", help="more `segresmamba fit` arguments after --, e.g. -- --trainer.limit_train_batches 2")
    args = p.parse_args(argv)
    args.fold = None if args.fold < 0 else args.fold

    if args.devices < 2:
        raise SystemExit(f"error: --devices must be >= 2 for a DDP check, got {args.devices}")
    if args.global_batch % args.devices:
        raise SystemExit(f"error: --global-batch {args.global_batch} is not divisible by --devices {args.devices}")
    if not (ROOT / "configs" / "model" / f"{args.model}.yaml").is_file():
        raise SystemExit(f"error: no configs/model/{args.model}.yaml")
    if not (ROOT / args.data_config).is_file():
        raise SystemExit(f"error: data config {args.data_config} not found")
    if args.accelerator == "gpu":
        import torch

        found = torch.cuda.device_count()
        if found < args.devices:
            raise SystemExit(f"error: --devices {args.devices} needs {args.devices} GPUs, this machine has {found}")
        name = card_slug(torch.cuda.get_device_name(0))
    else:
        name = "cpu"
    out = args.out or ROOT / "results" / "ddp" / name
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(args.devices)))

    visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(args.devices)))).split(",") if g]

    def fit(name: str, devices: int, seed: int, gpu: str | None) -> dict:
        record = out / f"{name}.json"
        record.unlink(missing_ok=True)
        run_env = dict(env)
        if gpu is not None:
            run_env["CUDA_VISIBLE_DEVICES"] = gpu
        t0 = time.perf_counter()
        rc = run_fit(fit_command(args, devices, seed, runs_dir, record), out / f"{name}.log", args.timeout_min * 60, run_env)
        row = _row(name, devices, seed, args.global_batch, record, rc, time.perf_counter() - t0)
        print(f"{name}: {row['status']}, best val Dice {row.get('best_val_dice_mean')}, fit {row.get('fit_wall_s')} s", flush=True)
        return row

    rows = [fit(f"ddp{args.devices}_seed{args.seeds[0]}", args.devices, args.seeds[0], None)]
    singles = [(f"one_seed{s}", 1, s) for s in args.seeds]
    if args.accelerator == "gpu" and len(visible) >= len(singles):
        # the one-device fits are independent: one per GPU at once (each alone on its card, so their
        # step times stay comparable), in the seed order of the table
        with ThreadPoolExecutor(len(singles)) as pool:
            rows += list(pool.map(lambda job: fit(*job[0], job[1]), zip(singles, visible)))
    else:
        rows += [fit(*job, visible[0] if args.accelerator == "gpu" else None) for job in singles]
    table = pd.DataFrame(rows)
    text, _, _ = verdict(table, args.tolerance)
    write_tables(table, text, args, out)
    print(text)
    print(f"wrote {out / 'ddp.md'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
