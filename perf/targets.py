"""The training step's speed targets against the measured figures: ``results/perf/targets.md``.

The targets (the training step near the hardware; BraTS 128^3, batch 1, bf16, one H100/H200):

- SegResMamba's eager step at most the nnU-Net-style (DynUNet) net's eager step of the same run;
- SegResMamba's step in its fastest supported mode at most :data:`FASTEST_MS`;
- SegResMamba's peak memory at most :data:`PEAK_GIB`;
- the ToM layer (C48, 64^3 tokens, forward and backward) at most :data:`TOM_RATIO` of mamba_ssm's three branches in the
  same run;
- SegMamba's step, in any mode, at most half of :data:`SEGMAMBA_BASELINE_MS`, its eager step when the targets were set.

Nothing is measured here: the figures are those ``make model-step`` and ``make bench-scan`` wrote
(``model_step.csv``, ``scan.csv``), whose rows carry their card and git commit. A comparison between two rows takes
them from one run, i.e. rows of one card and one commit (the latest such pair in the table); a target whose rows were
never measured together says so instead of pairing figures of different runs. The eager comparison also reads the
repeats of its run (``model_step_repeats/*.csv``: efficiency tables of other processes of the same card and commit),
since a host-bound step moves between processes; it is met only where every process meets it:

    python -m perf.targets --out results/perf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from perf import publish

FASTEST_MS = 30.0
PEAK_GIB = 3.0
TOM_RATIO = 0.25
SEGMAMBA_BASELINE_MS = 187.0  # SegMamba's eager bf16 step on an H200 at git d98b213, when the targets were set
TOM_CASE = "C48 64^3 b1"
RUN = ["device", "git_sha"]


def _eager(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the default eager step: no CUDA graphs, NCDHW, PyTorch's norms."""
    return rows[(rows.cuda_graphs == "-") & (rows.layout == "NCDHW") & (rows.norms == "torch")]


def _run(row) -> str:
    return f"{row.device}, git {str(row.git_sha)[:7]}"


def _last_run_with_all(rows: pd.DataFrame, masks: list[pd.Series]) -> tuple | None:
    """The (device, git_sha) of the last run, in table order, that has a row under every one of ``masks``."""
    runs = [tuple(r) for r in rows[RUN].drop_duplicates().itertuples(index=False)]
    have = [set(rows.loc[m, RUN].itertuples(index=False, name=None)) for m in masks]
    complete = [r for r in runs if all(r in h for h in have)]
    return complete[-1] if complete else None


def _target(name: str, measured: str = "no row", met: str = "not measured", source: str = "-") -> dict:
    """One row of the report; by default, a target with no figure."""
    return {"target": name, "measured": measured, "met": met, "source": source}


def _met(value: float, limit: float) -> str:
    return "yes" if value <= limit else "no"


# an efficiency table's columns of a bf16 step, by the names model_step.csv gives them
_STEP_COLUMNS = {"step_ms_bf16": "step_ms", "step_ms_pipelined_bf16": "pipelined_ms"}


def eager_repeats(paths: list[Path]) -> list[tuple[pd.Series, pd.Series]]:
    """SegResMamba's and the nnU-Net-style net's bf16 eager steps, one (SegResMamba, nnU-Net-style) pair of rows per
    repeat table (a process of the profiler), with model_step.csv's names for the step columns."""
    pairs = []
    for path in paths:
        t = pd.read_csv(path).rename(columns=_STEP_COLUMNS).set_index("model")
        if not {"segresmamba", "nnunet"} <= set(t.index):
            raise SystemExit(f"error: {path} lacks the segresmamba or the nnunet row of an eager repeat")
        pairs.append((t.loc["segresmamba"], t.loc["nnunet"]))
    return pairs


def _both_piped(s: pd.Series, b: pd.Series) -> bool:
    return pd.notna(s.get("pipelined_ms")) and pd.notna(b.get("pipelined_ms"))


def _eager_verdict(pairs: list[tuple[pd.Series, pd.Series]]) -> tuple[str, str]:
    """Text on the repeats and verdict of the eager target over the (SegResMamba, nnU-Net-style) rows of each process
    of its run, the first process first."""
    sync = sum(s.step_ms <= b.step_ms for s, b in pairs)
    piped = [(s, b) for s, b in pairs if _both_piped(s, b)]
    met_piped = sum(s.pipelined_ms <= b.pipelined_ms for s, b in piped)
    met = sync == len(pairs) and met_piped == len(piped)
    if len(pairs) == 1:
        return "", "yes" if met else "no"
    listed = "; ".join(f"{s.step_ms:.1f} / {b.step_ms:.1f}"
                       + (f", back to back {s.pipelined_ms:.1f} / {b.pipelined_ms:.1f}" if _both_piped(s, b) else "")
                       for s, b in pairs[1:])
    return (f". {len(pairs) - 1} more processes, synchronised {listed}",
            "yes" if met else f"in {sync} of {len(pairs)} processes synchronised, {met_piped} of {len(piped)} back to back")


def _peak_parts(row: pd.Series) -> str:
    """What a graphed row's peak is made of, where the row records it: the capture's own peak (its eager warm-up
    included), the graphs' memory pool, and what the process held from the GPU."""
    parts = [f"{label} {row.get(column):.2f}" for label, column in
             (("capture", "capture_peak_gib"), ("graphs' pool", "pool_gib"), ("held", "reserved_gib"))
             if pd.notna(row.get(column))]
    return f"; {', '.join(parts)} GiB" if parts else ""


def step_targets(table: pd.DataFrame, repeats: list[tuple[pd.Series, pd.Series]] = ()) -> list[dict]:
    """The four targets read from ``model_step.csv`` rows (bf16), one dict per target (the peak's two modes apart);
    ``repeats`` (:func:`eager_repeats`): other processes' eager steps, those of the eager comparison's run counted."""
    bf16 = table[(table.precision == "bf16") & table.step_ms.notna()]
    eager = _eager(bf16)
    out = []

    name = "SegResMamba eager step <= nnU-Net-style eager step (one run)"
    run = _last_run_with_all(eager, [eager.model == "segresmamba", eager.model == "nnunet"])
    if run is None:
        out.append(_target(name, "no run measured both"))
    else:
        in_run = eager[(eager.device == run[0]) & (eager.git_sha == run[1])]
        s, b = (in_run[in_run.model == model].iloc[-1] for model in ("segresmamba", "nnunet"))
        # a host-bound step moves between steps and processes: the spread goes beside the median, and the target is
        # met only where both timings (synchronised, and back to back where measured) meet it
        spread = (f" (slowest minus fastest step: {s.spread_ms:.1f} and {b.spread_ms:.1f})"
                  if pd.notna(s.get("spread_ms")) and pd.notna(b.get("spread_ms")) else "")
        back = f"; back to back {s.pipelined_ms:.1f} against {b.pipelined_ms:.1f}" if _both_piped(s, b) else ""
        more, met = _eager_verdict([(s, b)] + [(rs, rb) for rs, rb in repeats if (rs.device, rs.git_sha) == run])
        out.append(_target(name, f"{s.step_ms:.1f} ms against {b.step_ms:.1f} ms synchronised{spread}{back}{more}",
                           met, _run(s)))

    mine = bf16[bf16.model == "segresmamba"]
    fastest = mine.loc[mine.step_ms.idxmin()] if not mine.empty else None
    name = f"SegResMamba fastest mode <= {FASTEST_MS:g} ms"
    out.append(_target(name) if fastest is None else
               _target(name, f"{fastest.step_ms:.1f} ms ({_mode(fastest)})", _met(fastest.step_ms, FASTEST_MS), _run(fastest)))

    eager_peaks = _eager(mine[mine.peak_gib.notna()])
    name = f"SegResMamba peak <= {PEAK_GIB:g} GiB (eager)"
    if eager_peaks.empty:
        out.append(_target(name))
    else:
        p = eager_peaks.iloc[-1]
        out.append(_target(name, f"{p.peak_gib:.2f} GiB", _met(p.peak_gib, PEAK_GIB), _run(p)))
    if fastest is not None:
        name = f"SegResMamba peak <= {PEAK_GIB:g} GiB (fastest mode)"
        out.append(_target(name, "not recorded with the fastest row", source=_run(fastest)) if pd.isna(fastest.peak_gib) else
                   _target(name, f"{fastest.peak_gib:.2f} GiB ({_mode(fastest)}){_peak_parts(fastest)}{_within_peak(mine, fastest)}",
                           _met(fastest.peak_gib, PEAK_GIB), _run(fastest)))

    theirs = bf16[bf16.model == "segmamba"]
    limit = SEGMAMBA_BASELINE_MS / 2
    name = f"SegMamba step <= {limit:g} ms (half of {SEGMAMBA_BASELINE_MS:g})"
    if theirs.empty:
        out.append(_target(name))
    else:
        best = theirs.loc[theirs.step_ms.idxmin()]
        out.append(_target(name, f"{best.step_ms:.1f} ms ({_mode(best)}), {best.step_ms / SEGMAMBA_BASELINE_MS:.2f} of "
                                 f"{SEGMAMBA_BASELINE_MS:g}", _met(best.step_ms, limit), _run(best)))
    return out


def _within_peak(rows: pd.DataFrame, fastest) -> str:
    """Where the fastest row's peak is over the limit: the fastest graphed row of its run within it, if any (a user
    who needs the memory gives up that much speed)."""
    if not fastest.peak_gib > PEAK_GIB:
        return ""
    same_run = rows[(rows.device == fastest.device) & (rows.git_sha == fastest.git_sha) & (rows.cuda_graphs != "-")]
    within = same_run[same_run.peak_gib <= PEAK_GIB]
    if within.empty:
        return ""
    best = within.loc[within.step_ms.idxmin()]
    return f"; within {PEAK_GIB:g} GiB in that run: {best.peak_gib:.2f} GiB at {best.step_ms:.1f} ms ({_mode(best)})"


def _mode(row) -> str:
    parts = ["eager" if row.cuda_graphs == "-" else f"CUDA graphs: {row.cuda_graphs}"]
    if row.layout != "NCDHW":
        parts.append(row.layout)
    if row.norms != "torch":
        parts.append(f"norms {row.norms}")
    return ", ".join(parts)


def tom_target(scan: pd.DataFrame) -> dict:
    """The ToM layer's fused Triton forward and backward against mamba_ssm's, bf16, from one run of ``scan.csv``."""
    target = f"ToM {TOM_CASE} fwd+bwd <= {TOM_RATIO:g} x mamba_ssm (one run)"
    rows = scan[(scan.kind == "tom") & (scan.case == TOM_CASE) & (scan.precision == "bf16") & scan.fwd_bwd_ms.notna()]
    fused = (rows.backend == "triton") & rows.variant.fillna("").str.endswith("fused")
    reference = rows.backend == "mamba_ssm"
    run = _last_run_with_all(rows, [fused, reference])
    if run is None:
        return _target(target, "no run measured both")
    here = (rows.device == run[0]) & (rows.git_sha == run[1])
    mine, theirs = rows[fused & here].fwd_bwd_ms.min(), rows[reference & here].fwd_bwd_ms.iloc[-1]
    ratio = mine / theirs
    return _target(target, f"{mine:.2f} ms against {theirs:.2f} ms: {ratio:.2f} ({1 / ratio:.2f}x faster)",
                   _met(ratio, TOM_RATIO), f"{run[0]}, git {str(run[1])[:7]}")


def report(model_step: Path, scan: Path, repeats: list[Path] = ()) -> str:
    missing = [str(p) for p in (model_step, scan) if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found; `make model-step` and `make bench-scan` write them on a GPU")
    missing = [str(p) for p in repeats if not p.is_file()]
    if missing:
        raise SystemExit(f"error: eager repeat table(s) {', '.join(missing)} not found")
    rows = step_targets(pd.read_csv(model_step), eager_repeats(list(repeats))) + [tom_target(pd.read_csv(scan))]
    table = pd.DataFrame(rows)[["target", "measured", "met", "source"]]
    return "\n".join([
        "# The training step's speed targets against the measured figures",
        "",
        f"From `{model_step}` and `{scan}` (`python -m perf.targets`). BraTS 128^3, batch 1, bf16 (autocast), "
        "synthetic tensors. A comparison takes both rows from one run: the same card and git commit, the latest such "
        "pair in the table. \"Fastest mode\" is the fastest bf16 row of the model in any mode of `make model-step`. "
        "Figures of different rows may come from different runs; each names its own. The eager comparison also counts "
        f"the other processes of its run in {', '.join(f'`{p}`' for p in repeats) or 'no repeat table'} "
        "(SegResMamba / nnU-Net-style, ms).",
        "",
        table.to_markdown(index=False),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-step", type=Path, default=Path("results/perf/model_step.csv"))
    p.add_argument("--scan", type=Path, default=Path("results/perf/scan.csv"))
    p.add_argument("--repeats", type=Path, nargs="*",
                   help="efficiency tables of other processes of the eager run (default: model_step_repeats/*.csv "
                        "beside --model-step)")
    p.add_argument("--out", type=Path, help="write targets.md there (default: print only)")
    args = p.parse_args(argv)
    repeats = sorted((args.model_step.parent / "model_step_repeats").glob("*.csv")) if args.repeats is None else args.repeats
    text = report(args.model_step, args.scan, repeats)
    publish(text, args.out, "targets.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
