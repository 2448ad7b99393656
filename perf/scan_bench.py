"""Selective-scan backends on the GPU: the ToM layer and the scan alone, time, memory and bandwidth.

    python -m perf.scan_bench --out results/perf [--backends triton,mamba_ssm,torch] [--tune] [--quick]

Rows (``<out>/scan.csv``, summarised in ``<out>/scan.md``):

- ``copy``: a large device-to-device copy, bytes read + written over time: the card's practical
  memory bandwidth, measured in the same run as everything else.
- ``tom``: :class:`segresmamba.ssm.TriOrientedMamba` forward + backward (three scans, projections,
  convs) at C = 48 (64^3, 32^3), C = 96 (32^3, 16^3), C = 192 (16^3), batch 1 and 2, fp32 and bf16
  autocast; median of CUDA-event timings after warm-up, and the peak of ``max_memory_allocated``.
- ``scan``: one branch's selective scan alone (d_inner = 2C channels, d_state 16, L tokens, with D,
  z, delta_bias and softplus as in the layer), forward + backward. ``min_bytes`` is what any
  implementation must move: every input read once and every output written once, forward
  (u, delta, z, B, C -> y) plus backward (u, delta, z, B, C, dy -> du, ddelta, dz, dB, dC); over the
  time and the copy bandwidth it gives how close to memory-bound the scan runs.

- ``tune`` (with ``--tune``): the Triton launch settings compared on the largest scan; the fastest
  is used for every other row and written to ``<out>/tuning.json``.

With ``--profile``, the first ToM case (C = 48, 64^3, batch 1, bf16) is also run under
``torch.profiler`` for every backend, and ``<out>/profile_tom.md`` lists the GPU kernels by their share
of the fwd+bwd time: what bounds the layer, measured rather than guessed.

Rows are merged into an existing ``scan.csv`` by (device, kind, case, backend, precision, variant), so
backends can be measured in separate invocations.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from importlib.metadata import version as package_version
from pathlib import Path

import torch

from segresmamba.provenance import device_name, git_sha
from segresmamba.ssm import TriOrientedMamba, backend_status, selective_scan
from segresmamba.ssm.triton import triton_available, tuning

TOM_CASES = ((48, 64), (48, 32), (96, 32), (96, 16), (192, 16))  # (channels C, volume side)
BATCHES = (1, 2)
PRECISIONS = ("fp32", "bf16")
D_STATE = 16
# the pure-PyTorch scan launches thousands of small kernels per call: skip it where one step takes seconds
TORCH_MAX_ELEMENTS = 2 * 96 * 32**3  # batch x d_inner x tokens of one scan
FIELDS = (
    "device", "kind", "case", "backend", "precision", "variant", "batch", "channels", "side", "tokens",
    "fwd_bwd_ms", "spread_ms", "peak_gib", "min_bytes", "achieved_gbps", "copy_gbps", "fraction_of_copy",
    "note", "git_sha", "torch", "triton",
)


def cuda_time_ms(step, warmup: int, iters: int) -> tuple[float, float]:
    """Median and (max - min) of ``iters`` event-timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), max(times) - min(times)


def peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms, _ = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


PER_BRANCH = "triton_per_branch"


def backend_ready(name: str) -> str | None:
    """None when usable, else why not."""
    status = backend_status().get(name, "not registered")
    return None if status == "available" else status


def tom_step(layer, x, precision: str):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = layer(x)
        out.float().square().mean().backward()

    return step


def scan_inputs(b: int, d: int, length: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One branch's scan inputs as the layer makes them (A, D, bias in fp32)."""
    dev = "cuda"
    args = {
        "u": torch.randn(b, d, length, device=dev, dtype=dtype),
        "delta": torch.randn(b, d, length, device=dev, dtype=dtype) * 0.5,
        "A": -torch.arange(1, D_STATE + 1, device=dev, dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(b, D_STATE, length, device=dev, dtype=dtype),
        "C": torch.randn(b, D_STATE, length, device=dev, dtype=dtype),
        "D": torch.ones(d, device=dev),
        "z": torch.randn(b, d, length, device=dev, dtype=dtype),
        "delta_bias": torch.full((d,), math.log(math.expm1(0.01)), device=dev),
    }
    return {k: v.requires_grad_() for k, v in args.items()}


def scan_min_bytes(b: int, d: int, length: int, itemsize: int) -> int:
    per_channel = b * d * length  # u, delta, z, y, dy, du, ddelta, dz: 11 channel-sized transfers
    per_state = b * D_STATE * length  # B, C read twice, dB, dC written: 6 state-sized transfers
    return (11 * per_channel + 6 * per_state) * itemsize


def scan_step(args, backend: str):
    grad_y = torch.randn_like(args["u"])
    leaves = list(args.values())

    def step():
        y = selective_scan(**args, delta_softplus=True, backend=backend)
        torch.autograd.grad(y, leaves, grad_y)

    return step


# Triton launch settings compared by --tune on the largest scan (d_inner 96, 64^3 tokens, batch 1):
# the default first, then one change each
_TUNE_BASE = {"chunk": 64, "warps": 1, "bwd_warps": None, "bwd_maxnreg": None, "max_group": tuning.MAX_CHANNEL_GROUP,
              "upcast": "none", "bwd_mirror": None}
TUNE_VARIANTS = (
    _TUNE_BASE,
    {**_TUNE_BASE, "upcast": "states"},
    {**_TUNE_BASE, "upcast": "all"},
    {**_TUNE_BASE, "chunk": 32},
    {**_TUNE_BASE, "warps": 2},
    {**_TUNE_BASE, "max_group": 8},
    {**_TUNE_BASE, "chunk": 128, "warps": 4},
    # the backward alone ran 11 % (fp32) faster capped at 168 registers and 3-4 % faster over 32 channels per
    # program (results/perf/scan_notes.md, run 11): here they are timed on the whole scan, in both precisions
    {**_TUNE_BASE, "bwd_maxnreg": 168},
    {**_TUNE_BASE, "max_group": 32},
    # the dh recurrence of the backward as a reverse scan or mirrored (the base: chosen by the Triton version)
    {**_TUNE_BASE, "bwd_mirror": False},
    {**_TUNE_BASE, "bwd_mirror": True},
)
TIE = 1.02  # settings within 2 % of the fastest count as tied; the one with the lower peak memory wins


def describe(settings: dict) -> str:
    import triton

    text = " ".join(f"{k}={settings.get(k)}" for k in ("chunk", "warps", "bwd_warps", "bwd_maxnreg", "max_group", "upcast"))
    # named only where the backward runs mirrored: the rows measured before it could ran the reverse scan
    return f"{text} bwd_mirror=True" if tuning.mirrored_under(settings, triton.__version__) else text


def variant_error(batch: int = 2, d_inner: int = 16, length: int = 3001) -> float:
    """Largest relative error (output and every gradient) of the Triton scan in fp32 against the torch
    scan in fp64, so that a launch setting is never chosen for speed alone."""
    args = scan_inputs(batch, d_inner, length, torch.float32)
    ref = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    grad_y = torch.randn(batch, d_inner, length, device="cuda", dtype=torch.float64)
    y = selective_scan(**args, delta_softplus=True, backend="triton")
    y_ref = selective_scan(**ref, delta_softplus=True, backend="torch")
    got = torch.autograd.grad(y, list(args.values()), grad_y.float())
    want = torch.autograd.grad(y_ref, list(ref.values()), grad_y)
    errors = [(y.double() - y_ref).norm() / y_ref.norm()]
    errors += [(g.double() - w).norm() / w.norm().clamp_min(1e-2) for g, w in zip(got, want)]
    return max(e.item() for e in errors)


def pick_setting(totals: dict, peaks: dict) -> int:
    """Key of the fastest setting, or of the one with the lowest peak memory among those within ``TIE`` of it."""
    fastest = min(totals.values())
    tied = [i for i, t in totals.items() if t <= fastest * TIE]
    return min(tied, key=lambda i: (peaks.get(i, math.inf), totals[i]))


def tune(emit, common_row: dict) -> dict:
    """Time every variant on the largest scan in fp32 and bf16; keep the fastest correct one (sum of both),
    and among settings within ``TIE`` of it the one with the lowest peak memory (sum of both)."""
    batch, d_inner, length = 1, 96, 64**3
    totals, peaks = {}, {}
    for i, variant in enumerate(TUNE_VARIANTS):
        tuning.TUNING.update(variant)
        total = 0.0
        try:
            error = variant_error()
        except Exception as err:
            error, why = math.inf, f"error: {type(err).__name__}: {err}"[:300]
        else:
            why = f"max rel err vs fp64 {error:.1e}"
        if not error < 1e-4:
            total = math.inf
        for precision in PRECISIONS:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            row = {**common_row, "kind": "tune", "case": f"d{d_inner} L{length} b{batch}", "backend": "triton",
                   "precision": precision, "variant": describe(variant), "batch": batch, "channels": d_inner, "tokens": length,
                   "note": why}
            try:
                ms, spread, peak = measure(scan_step(scan_inputs(batch, d_inner, length, dtype), "triton"), slow=False)
                row.update(fwd_bwd_ms=round(ms, 3), spread_ms=round(spread, 3), peak_gib=round(peak, 3))
                total += ms
                peaks[i] = peaks.get(i, 0.0) + peak
            except Exception as err:
                row["note"] = f"error: {type(err).__name__}: {err}"[:300]
                total = math.inf
            torch.cuda.empty_cache()
            emit(row)
        totals[i] = total
    if all(math.isinf(t) for t in totals.values()):
        raise RuntimeError("no Triton launch setting passed the accuracy check")
    best = dict(TUNE_VARIANTS[pick_setting(totals, peaks)])
    tuning.TUNING.update(best)
    return best


PROFILE_TOP = 15  # kernels listed per backend
PROFILE_ITERS = 5  # profiled calls, after one warm-up


def kernel_breakdown(step, iters: int = PROFILE_ITERS) -> tuple[list[tuple[str, float, int]], float]:
    """GPU kernels of ``iters`` profiled calls after a warm-up: [(name, ms per call, launches per call)],
    largest first, and the summed kernel time per call in ms."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 1e3  # microseconds -> ms
            entry[1] += 1
    table = sorted(((name, ms / iters, count // iters) for name, (ms, count) in per_kernel.items()), key=lambda r: -r[1])
    return table, sum(r[1] for r in table)


def write_profile(out: Path, backends: list[str], common: dict) -> None:
    """``profile_tom.md``: the GPU kernels of one ToM fwd+bwd (C48 64^3 b1 bf16) for each backend."""
    channels, side, batch, precision = 48, 64, 1, "bf16"
    lines = [f"# ToM layer C{channels} {side}^3 b{batch} {precision}: GPU kernels of one fwd+bwd", "",
             f"{common['device']} · git {common['git_sha']} · torch {common['torch']} · triton {common['triton']}. "
             f"Random synthetic input and weights. torch.profiler, mean of {PROFILE_ITERS} calls after a warm-up; "
             "kernel time summed (the wall time in scan.csv also holds launch gaps). Names are cut at 90 characters.", ""]
    for backend in backends:
        scan_name = "triton" if backend == PER_BRANCH else backend
        if backend_ready(scan_name) or backend == "torch":
            continue
        torch.manual_seed(0)
        layer = TriOrientedMamba(channels, d_state=D_STATE, scan_backend=scan_name, fused=backend != PER_BRANCH).cuda()
        x = torch.randn(batch, channels, side, side, side, device="cuda", requires_grad=True)
        try:
            table, total = kernel_breakdown(tom_step(layer, x, precision))
        except Exception as err:
            lines += [f"## {backend}", "", f"error: {type(err).__name__}: {err}"[:300], ""]
            continue
        finally:
            layer = x = None
            torch.cuda.empty_cache()
        lines += [f"## {backend}: {total:.2f} ms of kernels, {sum(r[2] for r in table)} launches", "",
                  "| kernel | ms | share | launches |", "|---|---:|---:|---:|"]
        lines += [f"| `{name[:90]}` | {ms:.3f} | {ms / total:.1%} | {n} |" for name, ms, n in table[:PROFILE_TOP]]
        rest = table[PROFILE_TOP:]
        if rest:
            lines.append(f"| {len(rest)} other kernels | {sum(r[1] for r in rest):.3f} | {sum(r[1] for r in rest) / total:.1%} | "
                         f"{sum(r[2] for r in rest)} |")
        lines.append("")
        print(f"profiled {backend}: {total:.2f} ms of kernels", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_tom.md").write_text("\n".join(lines) + "\n")


def measure(step, slow: bool) -> tuple[float, float, float]:
    warmup, iters = (1, 3) if slow else (3, 10)
    ms, spread = cuda_time_ms(step, warmup, iters)
    return ms, spread, peak_gib(step)


def run(args) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32
    device = device_name()
    sha = git_sha()
    if sha == "unknown":  # a copy of the tree without .git: the caller passes the commit
        sha = os.environ.get("SEGRESMAMBA_GIT_SHA", "unknown")
    common = {"device": device, "git_sha": sha, "torch": torch.__version__,
              "triton": package_version("triton") if triton_available() else "none"}
    rows: list[dict] = []

    def emit(row):
        row = {**common, **row}
        rows.append(row)
        shown = {k: row.get(k) for k in ("kind", "case", "backend", "precision", "variant", "fwd_bwd_ms", "peak_gib", "fraction_of_copy", "note")}
        print(shown, flush=True)
        if args.out:
            write_csv(Path(args.out), rows, merge=True)

    copy_gbps = copy_bandwidth_gbps()
    emit({"kind": "copy", "case": "device-to-device copy 2 GiB", "backend": "torch", "precision": "fp32",
          "achieved_gbps": round(copy_gbps, 1), "copy_gbps": round(copy_gbps, 1), "fraction_of_copy": 1.0})

    if args.tune:
        best = tune(emit, {})
        (Path(args.out) / "tuning.json").write_text(json.dumps(best) + "\n")
        print("chosen Triton settings:", describe(best), flush=True)

    cases = TOM_CASES[:1] if args.quick else TOM_CASES
    batches = BATCHES[:1] if args.quick else BATCHES
    for kind in args.kinds:
        for channels, side in cases:
            length = side**3
            for batch in batches:
                for precision in PRECISIONS:
                    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
                    for backend in args.backends:
                        if backend == PER_BRANCH and kind != "tom":
                            continue  # the scan alone has no branches
                        scan_name = "triton" if backend == PER_BRANCH else backend
                        d_inner = 2 * channels
                        case = f"C{channels} {side}^3 b{batch}" if kind == "tom" else f"d{d_inner} L{length} b{batch}"
                        row = {"kind": kind, "case": case, "backend": backend, "precision": precision,
                               "variant": (describe(tuning.TUNING) + ("" if backend == PER_BRANCH or kind != "tom" else ", fused"))
                               if scan_name == "triton" else "",
                               "batch": batch, "channels": channels if kind == "tom" else d_inner, "side": side, "tokens": length}
                        why_not = backend_ready(scan_name)
                        if why_not:
                            emit({**row, "note": f"unavailable: {why_not}"[:200]})
                            continue
                        if backend == "torch" and batch * d_inner * length > TORCH_MAX_ELEMENTS:
                            emit({**row, "note": "skipped: pure-PyTorch scan too slow at this size"})
                            continue
                        torch.manual_seed(0)
                        step = None
                        try:
                            if kind == "tom":
                                layer = TriOrientedMamba(channels, d_state=D_STATE, scan_backend=scan_name, fused=backend != PER_BRANCH).cuda()
                                x = torch.randn(batch, channels, side, side, side, device="cuda", requires_grad=True)
                                step = tom_step(layer, x, precision)
                            else:
                                step = scan_step(scan_inputs(batch, d_inner, length, dtype), scan_name)
                            ms, spread, peak = measure(step, slow=backend == "torch")
                            row.update(fwd_bwd_ms=round(ms, 3), spread_ms=round(spread, 3), peak_gib=round(peak, 3))
                            if kind == "scan":
                                nbytes = scan_min_bytes(batch, d_inner, length, torch.finfo(dtype).bits // 8)
                                gbps = nbytes / (ms * 1e-3) / 1e9
                                row.update(min_bytes=nbytes, achieved_gbps=round(gbps, 1), copy_gbps=round(copy_gbps, 1),
                                           fraction_of_copy=round(gbps / copy_gbps, 4))
                        except Exception as err:  # one failing configuration must not lose the others
                            row["note"] = f"error: {type(err).__name__}: {err}"[:300]
                        finally:
                            step = layer = x = None
                            torch.cuda.empty_cache()
                        emit(row)
    if args.profile:
        write_profile(Path(args.out), args.backends, common)
    return rows


def _key(row: dict) -> tuple:
    return tuple(str(row.get(k, "")) for k in ("device", "kind", "case", "backend", "precision", "variant"))


def write_csv(out: Path, rows: list[dict], merge: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scan.csv"
    merged: dict[tuple, dict] = {}
    if merge and path.exists():
        with path.open(newline="") as f:
            for old in csv.DictReader(f):
                merged[_key(old)] = old
    for row in rows:
        merged[_key(row)] = {k: row.get(k, "") for k in FIELDS}
    all_rows = list(merged.values())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(all_rows)
    write_markdown(out, all_rows)
    return all_rows


def _f(value, fmt="{:.2f}") -> str:
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return "–"


def _column(row: dict) -> str:
    """Table column of a ToM row: Triton rows measured before the fused path existed have no "fused"
    in their variant and were per-branch measurements."""
    if row["backend"] == "triton" and "fused" not in str(row.get("variant", "")):
        return PER_BRANCH
    return row["backend"]


def write_markdown(out: Path, rows: list[dict]) -> None:
    lines = ["# Selective-scan backends: ToM layer and scan, forward + backward", ""]
    for device in sorted({r["device"] for r in rows}):
        at = [r for r in rows if r["device"] == device]
        copy = next((r for r in at if r["kind"] == "copy"), None)
        shas = sorted({r["git_sha"] for r in at})
        lines += [f"## {device}", "", f"git {', '.join(shas)} · torch {at[0].get('torch', '')} · triton {at[0].get('triton', '')} · "
                  "random synthetic inputs (precision per row)"]
        if copy:
            lines += ["", f"Device-to-device copy (read + write): **{_f(copy['copy_gbps'], '{:.0f}')} GB/s**."]
        lines += [
            "", "### ToM layer (TriOrientedMamba, d_state 16, expand 2), fwd+bwd median ms (peak GiB)", "",
            "triton = the fused ToM path (oriented conv and one-launch scans, no permuted copies of the channel x token activations); "
            f"{PER_BRANCH} = the Triton scan per branch with orient/unorient copies.", "",
            f"| case | precision | triton | {PER_BRANCH} | mamba_ssm | torch | mamba_ssm / triton |", "|---|---|---:|---:|---:|---:|---:|",
        ]
        tom = [r for r in at if r["kind"] == "tom"]
        for case in dict.fromkeys(r["case"] for r in tom):
            for precision in PRECISIONS:
                cells, times = [], {}
                for backend in ("triton", PER_BRANCH, "mamba_ssm", "torch"):
                    found = [r for r in tom if r["case"] == case and r["precision"] == precision and _column(r) == backend]
                    r = found[-1] if found else None  # the latest measurement
                    if r is None:
                        cells.append("not run")
                    elif r.get("fwd_bwd_ms") not in ("", None):
                        times[backend] = float(r["fwd_bwd_ms"])
                        cells.append(f"{_f(r['fwd_bwd_ms'])} ({_f(r['peak_gib'])})")
                    else:
                        cells.append(r.get("note", "")[:60] or "–")
                ratio = f"{times['mamba_ssm'] / times['triton']:.2f}x" if {"mamba_ssm", "triton"} <= times.keys() else "–"
                if any(c != "not run" for c in cells):
                    lines.append(f"| {case} | {precision} | {' | '.join(cells)} | {ratio} |")
        tuned = [r for r in at if r["kind"] == "tune"]
        if tuned:
            lines += ["", "### Triton launch settings on the largest scan (fwd+bwd ms)", "",
                      "| case | precision | variant | ms | peak GiB | note |", "|---|---|---|---:|---:|---|"]
            lines += [f"| {r['case']} | {r['precision']} | {r['variant']} | {_f(r.get('fwd_bwd_ms'), '{:.3f}')} | "
                      f"{_f(r.get('peak_gib'))} | {r.get('note', '')[:80]} |" for r in tuned]
        lines += [
            "", "### One scan alone (d_inner channels, d_state 16, with D, z, delta_bias, softplus), fwd+bwd", "",
            "min bytes: inputs read once + outputs written once, forward and backward.", "",
            "| case | precision | backend | variant | ms | peak GiB | min bytes (MB) | GB/s | of copy bw | note |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in at if r["kind"] == "scan"):
            mb = _f(float(r["min_bytes"]) / 1e6, "{:.0f}") if r.get("min_bytes") not in ("", None) else "–"
            lines.append(
                f"| {r['case']} | {r['precision']} | {r['backend']} | {r.get('variant', '')} | {_f(r.get('fwd_bwd_ms'), '{:.3f}')} | "
                f"{_f(r.get('peak_gib'))} | {mb} | {_f(r.get('achieved_gbps'), '{:.0f}')} | {_f(r.get('fraction_of_copy'), '{:.1%}')} | {r.get('note', '')[:80]} |"
            )
        lines.append("")
    (out / "scan.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/perf")
    parser.add_argument("--backends", default=f"triton,{PER_BRANCH},mamba_ssm,torch",
                        help=f"{PER_BRANCH}: the ToM layer with the Triton scan per branch (fused=False)")
    parser.add_argument("--kinds", default="tom,scan", help="tom, scan or both")
    parser.add_argument("--tune", action="store_true", help="first pick the fastest Triton launch settings (TUNE_VARIANTS)")
    parser.add_argument("--quick", action="store_true", help="first case and batch 1 only")
    parser.add_argument("--profile", action="store_true", help="also write profile_tom.md: kernel breakdown of C48 64^3 b1 bf16")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not torch.cuda.is_available():
        raise SystemExit("scan_bench needs a CUDA device")
    t0 = time.time()
    run(args)
    print(f"done in {time.time() - t0:.0f} s; wrote {args.out}/scan.csv and scan.md")


if __name__ == "__main__":
    main()
