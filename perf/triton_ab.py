"""The ToM layer's Triton kernels as compiled by two Triton versions, timed against each other on one GPU.

The scan kernels' machine code depends on the Triton version (``results/perf/kernel_resources_triton-*.md``: the
scan backward's loop has 2,413 instructions under Triton 3.6 and 1,542 under 3.9). A GPU machine has the Triton
its torch pins, and a Triton wheel (about 1 GB, built per Python version) cannot be carried to it. Its compiled
kernels can: a cubin is a few tens of kilobytes.

``build`` (any machine, no GPU needed, with the newer Triton installed) runs one forward and backward of the fused
ToM layer (C48, 64^3 tokens, batch 1, bf16, the Mamba layer's settings) on the CPU with the kernels' launches
recorded instead of run, and compiles each recorded launch for sm_90 exactly as Triton's JIT would specialise it
for those arguments (the same binder and attributes; :func:`compile_like_jit`). It writes each cubin and a JSON
index (signature, attributes, launch settings) to ``--out``.

``run`` (the GPU machine) records the same launches with the GPU's own Triton running them, checks that each
launch's arguments satisfy the built kernel's assumptions (dtypes and 16-byte divisibility), then per launch:
runs the JIT kernel and the built cubin (through the CUDA driver's ``cuLaunchKernel``) from the same inputs and
compares every tensor they write, and times both (CUDA events, median of ``--iters``). It writes
``triton_ab.md``::

    python -m perf.triton_ab build --out .triton_ab      # on a CPU machine with Triton 3.9
    python -m perf.triton_ab run --cubins .triton_ab --out results/perf   # on the GPU

Both sides must launch the same kernels: the same scan settings (``SEGRESMAMBA_TRITON_SCAN``), checked.
"""

from __future__ import annotations

import argparse
import ctypes
import json
from contextlib import contextmanager
from pathlib import Path

import torch

CHANNELS, SIDE, BATCH = 48, 64, 1
KERNEL_HOMES = {  # module -> the kernel names it launches
    "segresmamba.ssm.triton.autograd": ("_fwd_chunk_state_kernel", "_carry_kernel", "_fwd_output_kernel",
                                        "_bwd_chunk_state_kernel", "_bwd_grad_kernel"),
    "segresmamba.ssm.triton.fused_tom": ("_conv_fwd_kernel", "_conv_bwd_pre_kernel", "_conv_bwd_dx_kernel", "_gate_fwd_kernel",
                                         "_gate_bwd_kernel"),
    "segresmamba.ssm.triton.token_norm": ("_token_norm_fwd_kernel", "_token_norm_bwd_kernel"),
}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel in its module: ``kernel[grid](*args, **kwargs)`` records the launch
    and runs the real kernel where ``run`` is set."""

    def __init__(self, name, kernel, launches, run):
        self.name, self.kernel, self.launches, self.run = name, kernel, launches, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"name": self.name, "kernel": self.kernel, "grid": tuple(grid), "args": args, "kwargs": kwargs})
            if self.run:
                self.kernel[grid](*args, **kwargs)
        return launch


@contextmanager
def kernels_replaced(stand_in):
    """Every kernel the fused ToM path launches (:data:`KERNEL_HOMES`) replaced, in its module, by
    ``stand_in(name, kernel)`` while inside; the kernels are put back on the way out."""
    import importlib

    saved = []
    try:
        for module_name, names in KERNEL_HOMES.items():
            module = importlib.import_module(module_name)
            for name in names:
                kernel = getattr(module, name)
                saved.append((module, name, kernel))
                setattr(module, name, stand_in(name, kernel))
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


@contextmanager
def recording(run: bool):
    """Every scan, conv and norm kernel launch of the fused ToM path, in order, while inside."""
    launches = []
    with kernels_replaced(lambda name, kernel: _Recorder(name, kernel, launches, run)):
        yield launches


def tom_launches(device: torch.device, run: bool, side: int = SIDE) -> list[dict]:
    """The kernel launches of one forward and backward of the fused ToM layer (C48, ``side``^3 tokens, batch 1,
    bf16 activations as autocast gives them), recorded; run on ``device`` where ``run``."""
    from segresmamba.ssm.tom import TriOrientedMamba

    torch.manual_seed(0)
    layer = TriOrientedMamba(CHANNELS, scan_backend="triton").to(device)
    x = torch.randn(BATCH, CHANNELS, side, side, side, device=device, requires_grad=True)
    with recording(run) as launches:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = layer._mix(x, side, True)
        out.float().sum().backward()
    return launches


def _jit_flags(kernel) -> dict:
    """The options the installed Triton's JIT adds to a launch's arguments before binding them (3.9 has one more
    than 3.6)."""
    from triton import knobs

    flags = {"debug": kernel.debug or knobs.runtime.debug, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        flags["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return flags


def compile_like_jit(launch: dict):
    """Compile a recorded launch for sm_90 as the installed Triton's JIT would for its arguments: its own binder
    specialises them (dtypes, 16-byte divisibility, do_not_specialize), then ``triton.compile``. Returns the
    compiled kernel and the signature, attributes and constant values it was built for (an integer argument equal
    to 1 becomes a constant, as the JIT makes it)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from perf.kernel_resources import SM90 as target

    kernel = launch["kernel"]
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch["kwargs"], **_jit_flags(kernel)}
    bound, specialization, options = binder(*launch["args"], **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, signature, attrs, constexprs


def _divisible_params(attrs: dict) -> list[int]:
    return sorted(path[0] for path, values in attrs.items() if any(v[0] == "tt.divisibility" for v in values))


def build(out: Path, side: int = SIDE) -> list[dict]:
    """Compile every launch of :func:`tom_launches` (recorded on the CPU, not run) into ``out``: the cubins and
    ``index.json``."""
    import triton

    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, launch in enumerate(tom_launches(torch.device("cpu"), run=False, side=side)):
        compiled, signature, attrs, constexprs = compile_like_jit(launch)
        meta = compiled.metadata
        if meta.global_scratch_size or meta.profile_scratch_size:
            raise SystemExit(f"error: {launch['name']} needs scratch memory, which `run` does not allocate")
        cubin = out / f"{i:02d}_{launch['name']}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        index.append({"launch": i, "name": launch["name"], "cubin": cubin.name, "function": meta.name,
                      "num_warps": meta.num_warps, "shared": meta.shared, "signature": list(signature.values()),
                      "divisible": _divisible_params(attrs), "grid": list(launch["grid"]),
                      "constants": {str(path[0]): value for path, value in constexprs.items()}})
    from segresmamba.ssm.triton.tuning import TUNING

    (out / "index.json").write_text(json.dumps({"triton": triton.__version__, "side": side, "tuning": dict(TUNING),
                                                "launches": index}, indent=1))
    return index


# --- the GPU side: the CUDA driver API through ctypes, no other package -------------------------------------------

class _Driver:
    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._keep = []  # the loaded cubins' bytes, alive as long as their modules

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUDA driver error {status}")

    def function(self, cubin: bytes, name: str, shared: int):
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        self._keep.append(cubin)
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "cuModuleGetFunction")
        if shared > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(self.lib.cuFuncSetAttribute(function, 8, ctypes.c_int(shared)), "cuFuncSetAttribute")
        return function

    def launch(self, function, grid, threads: int, shared: int, params: list, stream: int | None = None) -> None:
        """``cuLaunchKernel`` on ``stream`` (default: torch's current stream), ``params`` the kernel's arguments as
        ctypes values, in order."""
        holders = (ctypes.c_void_p * len(params))(*[ctypes.cast(ctypes.pointer(p), ctypes.c_void_p) for p in params])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream if stream is None else stream)
        grid = (*grid, 1, 1)[:3]  # a 1- or 2-D Triton grid is (x, 1, 1) or (x, y, 1)
        self.check(self.lib.cuLaunchKernel(function, *[ctypes.c_uint(g) for g in grid], ctypes.c_uint(threads), ctypes.c_uint(1),
                                           ctypes.c_uint(1), ctypes.c_uint(shared), stream, holders, None), "cuLaunchKernel")


_POINTEE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i32": torch.int32, "i64": torch.int64}
_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
           "fp32": ctypes.c_float, "fp64": ctypes.c_double, "i1": ctypes.c_bool}


def kernel_params(entry: dict, launch: dict) -> list:
    """The cubin's parameters for a recorded launch: its non-constexpr arguments as the built signature types them,
    then the two scratch pointers every Triton 3.x kernel takes (null: none is needed). Raises ValueError where an
    argument breaks an assumption the cubin was compiled with."""
    args = list(launch["args"]) + [launch["kwargs"][p.name] for p in launch["kernel"].params[len(launch["args"]):]
                                   if p.name in launch["kwargs"]]
    if len(args) != len(entry["signature"]):
        raise ValueError(f"{entry['name']}: {len(args)} arguments recorded, {len(entry['signature'])} in the built signature")
    params = []
    for i, (arg, kind) in enumerate(zip(args, entry["signature"])):
        if kind == "constexpr":
            if str(i) in entry["constants"] and arg != entry["constants"][str(i)]:
                raise ValueError(f"{entry['name']}: argument {i} = {arg}; the cubin was built with it = {entry['constants'][str(i)]}")
            continue
        if kind.startswith("*"):
            if not isinstance(arg, torch.Tensor):
                raise ValueError(f"{entry['name']}: argument {i} should be a tensor ({kind})")
            if _POINTEE.get(kind[1:], arg.dtype) != arg.dtype:
                raise ValueError(f"{entry['name']}: argument {i} is {arg.dtype} here; the cubin reads {kind[1:]}")
            if i in entry["divisible"] and arg.data_ptr() % 16:
                raise ValueError(f"{entry['name']}: argument {i} is not 16-byte aligned here; the cubin assumes it")
            params.append(ctypes.c_uint64(arg.data_ptr()))
        else:
            if i in entry["divisible"] and int(arg) % 16:
                raise ValueError(f"{entry['name']}: argument {i} = {arg} is not a multiple of 16; the cubin assumes it")
            params.append(_CTYPES[kind](arg))
    return params + [ctypes.c_uint64(0), ctypes.c_uint64(0)]


def _tensors(launch: dict) -> list[torch.Tensor]:
    return [a for a in (*launch["args"], *launch["kwargs"].values()) if isinstance(a, torch.Tensor)]


def largest_difference(first, second, tensors: list[torch.Tensor]) -> float:
    """Run ``first``, put every byte of the ``tensors``' storages back as it was, run ``second``; return the largest
    difference between what the two left in the tensors, relative to each tensor's largest value after ``first``.

    Whole storages are saved and restored, not the tensors: a recorded argument may be a broadcast (stride-0) view,
    which cannot be written element by element, or overlap another argument."""
    storages = {}
    for t in tensors:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    flat = [torch.empty(0, dtype=torch.uint8, device=s.device).set_(s) for s in storages.values()]
    start = [f.clone() for f in flat]
    first()
    after_first = [t.clone() for t in tensors]
    for f, s in zip(flat, start):
        f.copy_(s)
    second()
    if tensors and tensors[0].is_cuda:
        torch.cuda.synchronize()
    worst = 0.0
    for got, want in zip(tensors, after_first):
        scale = want.float().abs().max().item() or 1.0
        worst = max(worst, (got.float() - want.float()).abs().max().item() / scale)
    return worst


def _compare(entry: dict, launch: dict, driver: "_Driver", cubins: Path, iters: int) -> dict:
    """Launch one recorded kernel by the JIT and by its cubin from the same inputs; compare what they write, time both."""
    from perf.scan_bench import cuda_time_ms

    name = entry["name"]
    try:
        params = kernel_params(entry, launch)
    except ValueError as err:
        return {"kernel": name, "note": str(err)}
    try:  # a driver older than the cubin's toolchain refuses to load it: say so and go on
        function = driver.function((cubins / entry["cubin"]).read_bytes(), entry["function"], entry["shared"])
    except (OSError, RuntimeError) as err:
        return {"kernel": name, "note": str(err)}
    threads = 32 * entry["num_warps"]

    def jit():
        launch["kernel"][launch["grid"]](*launch["args"], **launch["kwargs"])

    def built():
        driver.launch(function, launch["grid"], threads, entry["shared"], params)

    worst = largest_difference(jit, built, _tensors(launch))
    (jit_ms, _), (built_ms, _) = cuda_time_ms(jit, 3, iters), cuda_time_ms(built, 3, iters)
    return {"kernel": name, "grid": "x".join(map(str, launch["grid"])), "jit_ms": jit_ms, "built_ms": built_ms,
            "ratio": built_ms / jit_ms, "max_rel_diff": worst, "note": ""}


def run(cubins: Path, out: Path, iters: int) -> Path:
    import triton

    from segresmamba.provenance import provenance
    from segresmamba.ssm.triton.tuning import TUNING

    index = json.loads((cubins / "index.json").read_text())
    if index["tuning"] != dict(TUNING):
        raise SystemExit(f"error: the cubins were built under the scan settings {index['tuning']}, this process has {dict(TUNING)}; "
                         "set SEGRESMAMBA_TRITON_SCAN alike on both machines")
    launches = tom_launches(torch.device("cuda"), run=True, side=index["side"])
    torch.cuda.synchronize()
    if [e["name"] for e in index["launches"]] != [launch["name"] for launch in launches]:
        raise SystemExit("error: the launches recorded here differ from those the cubins were built for")
    driver = _Driver()
    # the recorded tensors include views made under no_grad inside the autograd function: restoring them must not be tracked
    with torch.no_grad():
        rows = [_compare(entry, launch, driver, cubins, iters) for entry, launch in zip(index["launches"], launches)]
    prov = provenance(torch.device("cuda"), "bf16")
    lines = [f"# ToM layer kernels: Triton {triton.__version__} (JIT here) against Triton {index['triton']} (built elsewhere)", "",
             f"{prov['device']} · git {prov['git_sha']} · torch {prov['versions'].get('torch')}. One forward and backward of the "
             f"fused ToM layer, C{CHANNELS} {index['side']}^3 tokens, batch {BATCH}, bf16 activations, random synthetic inputs; each "
             f"kernel launch recorded, then launched again alone: median of {iters} CUDA-event times. max_rel_diff: the largest "
             "difference between what the two builds write, over every tensor argument, relative to its largest value.", "",
             "| kernel | grid | JIT ms | built ms | built / JIT | max_rel_diff | note |", "|---|---|--:|--:|--:|--:|---|"]
    for r in rows:
        if "jit_ms" in r:
            lines.append(f"| `{r['kernel']}` | {r['grid']} | {r['jit_ms']:.3f} | {r['built_ms']:.3f} | {r['ratio']:.2f} | "
                         f"{r['max_rel_diff']:.1e} | |")
        else:
            lines.append(f"| `{r['kernel']}` | | | | | | {r['note']} |")
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "triton_ab.md"
    dest.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the ToM layer's launches for sm_90 with the installed Triton (no GPU needed)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--side", type=int, default=SIDE, help=f"tokens per side of the ToM layer's input (default {SIDE})")
    r = sub.add_parser("run", help="on the GPU: time each built kernel against the installed Triton's JIT")
    r.add_argument("--cubins", type=Path, required=True)
    r.add_argument("--out", type=Path, default=Path("results/perf"))
    r.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if args.command == "build":
        index = build(args.out, args.side)
        print(f"built {len(index)} launches into {args.out}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("error: `perf.triton_ab run` needs a GPU (CUDA is not available)")
    if not (args.cubins / "index.json").is_file():
        raise SystemExit(f"error: {args.cubins / 'index.json'} not found; run `python -m perf.triton_ab build --out {args.cubins}` first")
    run(args.cubins, args.out, args.iters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
