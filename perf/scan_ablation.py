"""What bounds the scan backward: its kernel with parts cut out, timed (GPU) or compiled (CPU).

Each ablation edits the source of ``_bwd_grad_kernel`` (:mod:`segresmamba.ssm.triton.kernels`) by exact text
replacement and loads the edited kernel in place of the real one; the launch-setting rows change
:data:`segresmamba.ssm.triton.tuning.TUNING` instead. The edited kernels compute wrong gradients on purpose: only
their time counts. A replacement whose text is no longer in the kernel fails loudly, so the list cannot drift
from the source silently.

- on a GPU: the whole backward pass of one scan (the tune case of :mod:`perf.scan_bench`: d 96 over 64^3 tokens,
  batch 1, its synthetic inputs, the Mamba layer's flags), CUDA events, median of ``--iters`` after 3 warm-ups,
  fp32 and bf16 inputs;
  ``<out>/scan_ablation.md``.
- ``--static`` (any machine): each variant compiled for sm_90 (:mod:`perf.kernel_resources`), its registers,
  spills and hot-loop instructions; ``<out>/scan_ablation_static_triton-<version>.md``.

    python -m perf.scan_ablation --out results/perf            # GPU
    python -m perf.scan_ablation --static --out results/perf   # CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

# name -> (what it removes, [(text in the kernel, replacement)])
ABLATIONS = {
    "as is": ("nothing", []),
    "no atomics": ("dB, dC stored, not added atomically", [(
        '    tl.atomic_add(dB_ptr + state_idx, dB_acc, mask=mask_nt, sem="relaxed")\n'
        '    tl.atomic_add(dC_ptr + state_idx, dC_acc, mask=mask_nt, sem="relaxed")',
        "    tl.store(dB_ptr + state_idx, dB_acc + dC_acc, mask=mask_nt)")]),
    "no dB, dC": ("the dB and dC accumulation (two fewer live tiles)", [
        ("        dC_acc += h * g[None, :]\n", ""), ("        dB_acc += dh * dtu[None, :]\n", "")]),
    "dh scan forwards": ("the reverse scan's flips (the dh scan run forwards)", [
        ("_, dh = tl.associative_scan((a_next, beta), 1, _combine, reverse=True)",
         "_, dh = tl.associative_scan((a_next, beta), 1, _combine)")]),
    "no dh scan": ("the dh scan", [
        ("_, dh = tl.associative_scan((a_next, beta), 1, _combine, reverse=True)", "dh = a_next * beta")]),
    "no h scan": ("the h scan", [
        ("_, h = tl.associative_scan((a, x + tl.where(first, a * h0[:, None], 0.0)), 1, _combine)",
         "h = a * x + tl.where(first, a * h0[:, None], 0.0)")]),
    "no scans": ("both scans", [
        ("_, dh = tl.associative_scan((a_next, beta), 1, _combine, reverse=True)", "dh = a_next * beta"),
        ("_, h = tl.associative_scan((a, x + tl.where(first, a * h0[:, None], 0.0)), 1, _combine)",
         "h = a * x + tl.where(first, a * h0[:, None], 0.0)")]),
}
SETTINGS = {
    "bwd_maxnreg 128": {"bwd_maxnreg": 128}, "bwd_maxnreg 168": {"bwd_maxnreg": 168},
    "bwd_maxnreg 200": {"bwd_maxnreg": 200}, "max_group 4": {"max_group": 4}, "max_group 32": {"max_group": 32},
    "bwd_warps 2": {"bwd_warps": 2}, "mirrored": {"bwd_mirror": True},
}


def edited_kernel(name: str):
    """``_bwd_grad_kernel`` with the ablation ``name``'s replacements, loaded from a temporary module."""
    from segresmamba.ssm.triton import kernels

    source = Path(kernels.__file__).read_text()
    for old, new in ABLATIONS[name][1]:
        if old not in source:
            raise ValueError(f"ablation {name!r}: {old.strip()[:80]!r} is no longer in {kernels.__file__}")
        source = source.replace(old, new)
    module_name = "scan_ablation_" + "".join(c if c.isalnum() else "_" for c in name)
    path = Path(tempfile.mkdtemp()) / f"{module_name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton reads the function's module globals
    spec.loader.exec_module(module)
    return module._bwd_grad_kernel


def time_backward(dtype: torch.dtype, iters: int) -> float:
    """Median ms of the scan's backward pass (its kernels and the reductions after them), on the inputs and with
    the event timing of the scan benchmark's tune case."""
    from perf.scan_bench import cuda_time_ms, scan_inputs
    from segresmamba.ssm.triton import autograd, tuning

    a = {k: v.detach() for k, v in scan_inputs(1, 96, 64**3, dtype).items()}
    y, saved = autograd.scan_forward(a["u"], a["delta"], a["A"][None], a["B"], a["C"], a["D"][None], a["z"],
                                     a["delta_bias"][None], True, (0,), 1, 1, tuning.TUNING["chunk"])
    grad_y = torch.randn_like(y)
    return cuda_time_ms(lambda: autograd.scan_backward(saved, grad_y), warmup=3, iters=iters)[0]


def _variants():
    """(name, what changes, kernel or None, settings) of every row."""
    rows = [(name, what, name, {}) for name, (what, _) in ABLATIONS.items()]
    rows += [(name, "launch setting", None, settings) for name, settings in SETTINGS.items()]
    return rows


def measure(iters: int) -> list[dict]:
    from segresmamba.ssm.triton import autograd, tuning

    real_kernel, real_tuning = autograd._bwd_grad_kernel, dict(tuning.TUNING)
    rows = []
    try:
        for name, what, ablation, settings in _variants():
            autograd._bwd_grad_kernel = edited_kernel(ablation) if ablation else real_kernel
            tuning.TUNING.clear()
            # the ablations edit the reverse-scan formulation of the dh recurrence, so every row runs it but "mirrored"
            tuning.TUNING.update({**real_tuning, "bwd_mirror": False, **settings})
            row = {"variant": name, "what": what}
            for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                row[f"{label}_ms"] = round(time_backward(dtype, iters), 3)
            rows.append(row)
            print(row, flush=True)
    finally:
        autograd._bwd_grad_kernel = real_kernel
        tuning.TUNING.clear()
        tuning.TUNING.update(real_tuning)
    return rows


def static_counts() -> list[dict]:
    """Each ablation compiled for sm_90 at the suite's settings (one warp, 64-token chunks, bf16 inputs)."""
    from perf.kernel_resources import BF16_INPUTS, compile_for_sm90, resources

    # the ablations edit the reverse-scan formulation of the dh recurrence
    constexprs = {"T": 64, "BN": 16, "HAS_BIAS": True, "SOFTPLUS": True, "HAS_D": True, "HAS_Z": True, "MIRROR": False}
    rows = []
    for name, what, ablation, settings in _variants():
        options = {"maxnreg": settings["bwd_maxnreg"]} if "bwd_maxnreg" in settings else {}
        mirror = settings.get("bwd_mirror", False)
        if ablation is None and not options and not mirror:
            continue  # the other settings change the grid or the warps, not one warp's code
        kernel = edited_kernel(ablation) if ablation else edited_kernel("as is")
        compiled = compile_for_sm90(kernel, {**constexprs, "MIRROR": mirror}, BF16_INPUTS, 1, **options)
        rows.append({"variant": name, "what": what, **resources(compiled)})
    return rows


def main(argv: list[str] | None = None) -> int:
    import triton

    from segresmamba.provenance import device_name, git_sha

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / "perf")
    parser.add_argument("--static", action="store_true", help="compile each variant for sm_90 instead of timing it (no GPU needed)")
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.static:
        rows = static_counts()
        dest = args.out / f"scan_ablation_static_triton-{triton.__version__}.md"
        intro = (f"Compiled for sm_90 on a CPU by Triton {triton.__version__}, git {git_sha()[:7]}; columns as in "
                 "`kernel_resources_*.md`; bf16 activations, the Mamba layer's flags, one warp over 64-token chunks, 16 states; "
                 "nothing runs, so no data.")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: timing the ablations needs a GPU; --static compiles them on a CPU")
        rows = measure(args.iters)
        dest = args.out / "scan_ablation.md"
        intro = (f"{device_name()} · torch {torch.__version__} · Triton {triton.__version__} · git {git_sha()[:7]}. The "
                 "backward pass of one scan, d 96 over 64^3 tokens, batch 1, the scan benchmark's synthetic inputs, median ms of "
                 f"{args.iters} after 3 warm-ups (CUDA events); fp32 and bf16 inputs.")
    lines = ["# Scan backward ablations", "", intro,
             "The edited kernels compute wrong gradients on purpose: only their cost counts (`perf/scan_ablation.py`).", "",
             pd.DataFrame(rows).to_markdown(index=False)]
    dest.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
