"""What the suite's Triton kernels cost a GPU's registers, on a CPU: ``results/perf/kernel_resources_triton-<version>.md``.

Each scan kernel goes through Triton's whole compiler for an sm_90 GPU (``GPUTarget("cuda", 90, 32)``: TTIR,
TTGIR, LLVM, PTX and ptxas, all shipped with the ``triton`` wheel) with the launch settings the suite uses, on a
machine without a GPU. From the cubin, with the ``cuobjdump`` and ``nvdisasm`` of the same wheel, the report
takes registers per thread, the stack (spilled registers) and shared memory, and counts the SASS instructions of
the kernel's longest loop (the channel loop of the scan kernels) by kind: shuffles across a warp's lanes
(``SHFL``), spill loads and stores (``LDL``/``STL``), exponentials (``MUFU``) and the total.

These counts explain timings; they do not replace them (a kernel with fewer shuffles measured slower, see
``results/perf/scan_notes.md``, run 11). The counts depend on the Triton version, written beside them.

    python -m perf.kernel_resources --out results/perf
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:  # no Triton, or one without the ahead-of-time compiler API
    raise SystemExit(f"error: perf.kernel_resources needs Triton with triton.compiler.ASTSource ({err}); "
                     "`pip install -e \".[dev]\"` installs it on Linux x86-64") from None

SM90 = GPUTarget("cuda", 90, 32)
FLOAT_SCALARS = {"eps"}
BF16_INPUTS = {name: "*bf16" for name in ("u_ptr", "delta_ptr", "z_ptr", "dy_ptr", "y_ptr", "B_ptr", "C_ptr", "x_ptr", "gu_ptr")}
# the gate kernels read and write the fused layer's bf16 activations (the branch outputs, z, their sum and gradients)
GATE_INPUTS = {name: "*bf16" for name in ("y_ptr", "z_ptr", "ysum_ptr", "out_ptr", "g_ptr", "gy_ptr", "dz_ptr")}
COUNTED = ("SHFL", "LDL", "STL", "MUFU", "BAR")


def compile_for_sm90(kernel, constexprs: dict, pointer_types: dict | None = None, num_warps: int = 4, **options):
    """Compile ``kernel`` (a ``@triton.jit`` function) for sm_90 with ``constexprs``; other arguments are pointers
    (``*fp32`` unless ``pointer_types`` says otherwise, for names ending in ``_ptr``) or 32-bit integers, all with
    the divisibility by 16 a GPU call specialises on. ``options``: further compile options (e.g. ``maxnreg``)."""
    pointer_types = pointer_types or {}
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"give values for the constexpr arguments {missing}")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=SM90, options={"num_warps": num_warps, **options})


def _nvidia_tool(name: str) -> Path:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not tool.is_file():
        raise FileNotFoundError(f"{tool} not found: this Triton wheel ships no {name}")
    return tool


def _opcode(line: str) -> str | None:
    match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
    return match.group(1).split(".")[0] if match else None


def longest_loop(sass: str) -> list[str]:
    """The instruction lines of the longest backward branch's body (a kernel's hot loop), [] if it has none (a
    branch to itself, the trap ptxas puts after the exit, is no loop)."""
    lines = sass.splitlines()
    labels, best = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = i
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            body = [line for line in lines[labels[target.group(1)]:i + 1] if _opcode(line)]
            if len(body) > 1 and len(body) > len(best):
                best = body
    return best


def resources(compiled) -> dict:
    """Registers, stack and shared bytes of a compiled kernel, and its hot loop's instruction counts."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if not found:
        raise RuntimeError(f"cuobjdump reported no resource usage: {usage[:300]}")
    loop = collections.Counter(_opcode(line) for line in longest_loop(sass))
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)), "shared_bytes": int(found.group(3)),
            "instructions": sum(1 for line in sass.splitlines() if _opcode(line)),
            "loop_instructions": sum(loop.values()), **{f"loop_{op.lower()}": loop[op] for op in COUNTED}}


def scan_cases() -> list[tuple[str, object, dict, dict, int]]:
    """(name, kernel, constexprs, pointer types, warps) of the scan and oriented-conv kernels at the suite's
    settings (:data:`segresmamba.ssm.triton.tuning.TUNING`: one warp over 64-token chunks, 16 states) and at the
    32-token chunk the tune also times; the Mamba layer's flags (softplus, delta bias, D, z) on, bf16 inputs; and the
    fused ToM layer's ungated scans and its gate kernels."""
    from segresmamba.ssm.triton import kernels as k

    flags = {"HAS_BIAS": True, "SOFTPLUS": True}
    full = {**flags, "HAS_D": True, "HAS_Z": True}
    cases = []
    for chunk in (64, 32):
        tile = {"T": chunk, "BN": 16}
        cases += [
            (f"fwd chunk state, T={chunk}", k._fwd_chunk_state_kernel, {**tile, **flags}, BF16_INPUTS, 1),
            (f"fwd output, T={chunk}", k._fwd_output_kernel, {**tile, **full}, BF16_INPUTS, 1),
            (f"bwd chunk state, T={chunk}", k._bwd_chunk_state_kernel, {**tile, "HAS_Z": True, **flags}, BF16_INPUTS, 1),
            (f"bwd grad, T={chunk}", k._bwd_grad_kernel, {**tile, **full, "MIRROR": False}, BF16_INPUTS, 1),
        ]
    # the fused ToM layer's scans run ungated (its gate is applied once to the branches' sum, by the gate kernels)
    ungated = {**full, "HAS_Z": False}
    tile = {"T": 64, "BN": 16}
    cases += [
        ("fwd output, T=64, ungated", k._fwd_output_kernel, {**tile, **ungated}, BF16_INPUTS, 1),
        ("bwd chunk state, T=64, ungated", k._bwd_chunk_state_kernel, {**tile, "HAS_Z": False, **flags}, BF16_INPUTS, 1),
        ("bwd grad, T=64, ungated", k._bwd_grad_kernel, {**tile, **ungated, "MIRROR": False}, BF16_INPUTS, 1),
        # the dh recurrence as a forward scan of the chunk read backwards (tuning.mirrored_backward)
        ("bwd grad, T=64, mirrored", k._bwd_grad_kernel, {**tile, **full, "MIRROR": True}, BF16_INPUTS, 1),
        ("bwd grad, T=64, ungated, mirrored", k._bwd_grad_kernel, {**tile, **ungated, "MIRROR": True}, BF16_INPUTS, 1),
        ("gate fwd", k._gate_fwd_kernel, {"R": 3, "BT": 128, "BD": 16}, GATE_INPUTS, 4),
        ("gate bwd", k._gate_bwd_kernel, {"BT": 128, "BD": 16}, GATE_INPUTS, 4),
    ]
    cases += [
        ("carry", k._carry_kernel, {"ROWS": 64, "BLOCK": 32, "REVERSE": True}, None, 4),
        ("conv fwd", k._conv_fwd_kernel, {"K": 4, "BT": 128, "BD": 16, "NEAR": True}, BF16_INPUTS, 4),
        ("conv bwd pre", k._conv_bwd_pre_kernel, {"K": 4, "BT": 128, "BD": 16, "NEAR": True}, BF16_INPUTS, 4),
        ("conv bwd dx", k._conv_bwd_dx_kernel, {"K": 4, "BT": 128, "BD": 16, "NEAR": True}, {"dx_ptr": "*bf16"}, 4),
    ]
    return cases


def report(out: Path) -> Path:
    from segresmamba.provenance import git_sha

    sha = git_sha()
    rows = []
    for name, kernel, constexprs, pointer_types, warps in scan_cases():
        rows.append({"kernel": name, "warps": warps, **resources(compile_for_sm90(kernel, constexprs, pointer_types, warps))})
    lines = [
        "# Triton kernels of the scan and the oriented conv: registers and hot-loop instructions on sm_90",
        "",
        f"Compiled on a CPU for sm_90 by Triton {triton.__version__} (its ptxas; no GPU), git {sha[:7]}"
        f"{'-dirty' if sha.endswith('-dirty') else ''}, "
        "`python -m perf.kernel_resources`. Compiled with the suite's launch settings: bf16 activations (fp32 state and "
        "weights), the Mamba layer's flags (softplus, delta bias, D, z), 16 states, and every integer argument "
        "divisible by 16 (a launch specialises only some of them, and turns those equal to 1 into constants: "
        "`perf.triton_ab build` compiles one ToM layer's launches exactly as the JIT specialises them). Nothing runs, "
        "so no data. "
        "registers per thread (255 is the cap; past it ptxas spills to "
        "`stack_bytes`); instructions: the whole kernel's SASS, once through its code; loop_*: SASS instructions of the kernel's longest loop, once through (the channel loop of "
        "the scan kernels: one channel of one chunk; 0: no loop, its loops unrolled); shfl = shuffles across a warp's lanes, ldl/stl = spill "
        "loads/stores, mufu = exponentials and other special functions, bar = barriers. The GPU runs use the Triton "
        "of their machine (results/perf/scan.md); counts from another Triton version can differ.",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
    ]
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"kernel_resources_triton-{triton.__version__}.md"
    dest.write_text("\n".join(lines) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / "perf")
    args = parser.parse_args(argv)
    dest = report(args.out)
    print(dest.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
