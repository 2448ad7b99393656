"""Every Triton kernel of the suite compiles for an sm_90 GPU, on a CPU.

Triton's interpreter (the ``-k interpreter`` tests) runs a kernel's Python semantics and never compiles it: a
loop-carried value that changes type or an op the GPU compiler rejects passes there and fails on the first GPU call.
Here each kernel goes through Triton's whole compiler for ``GPUTarget("cuda", 90, 32)`` (TTIR, TTGIR, LLVM, PTX and
ptxas, all of which ship with the ``triton`` wheel) with the launch settings the suite uses, and with the
specialisations a GPU call makes (pointers and sizes divisible by 16). No GPU and no CUDA driver are needed.
"""

import pytest

triton = pytest.importorskip("triton")

try:
    from perf.kernel_resources import compile_for_sm90
except SystemExit:  # another Triton layout (no ASTSource / GPUTarget)
    pytest.skip("this Triton has no ASTSource / GPUTarget", allow_module_level=True)


def _scan_cases():
    from segresmamba.ssm.triton import kernels as k

    flags = {"HAS_BIAS": True, "SOFTPLUS": True}
    tile = {"T": 64, "BN": 16}
    bf16_inputs = {name: "*bf16" for name in ("u_ptr", "delta_ptr", "z_ptr", "dy_ptr", "y_ptr", "B_ptr", "C_ptr")}
    return [
        ("fwd chunk state", k._fwd_chunk_state_kernel, {**tile, **flags}, bf16_inputs, 1),
        ("carry", k._carry_kernel, {"ROWS": 64, "BLOCK": 32, "REVERSE": True}, None, 4),
        ("fwd output", k._fwd_output_kernel, {**tile, **flags, "HAS_D": True, "HAS_Z": True}, bf16_inputs, 1),
        ("bwd chunk state", k._bwd_chunk_state_kernel, {**tile, "HAS_Z": True, **flags}, bf16_inputs, 1),
        ("bwd grad", k._bwd_grad_kernel, {**tile, **flags, "HAS_D": True, "HAS_Z": True, "MIRROR": False}, bf16_inputs, 1),
        ("bwd grad, mirrored", k._bwd_grad_kernel, {**tile, **flags, "HAS_D": True, "HAS_Z": True, "MIRROR": True}, bf16_inputs, 1),
        # the longer chunks a sequence past the grid limit gets (autograd.MAX_CHUNKS), at the tuned one warp
        ("fwd output, 128-token chunks", k._fwd_output_kernel, {**tile, "T": 128, **flags, "HAS_D": True, "HAS_Z": True}, bf16_inputs, 1),
        ("bwd grad, 128-token chunks", k._bwd_grad_kernel, {**tile, "T": 128, **flags, "HAS_D": True, "HAS_Z": True, "MIRROR": True}, bf16_inputs, 1),
        ("conv fwd", k._conv_fwd_kernel, {"K": 4, "BT": 128, "BD": 16, "NEAR": True}, {"x_ptr": "*bf16", "u_ptr": "*bf16"}, 4),
        ("conv bwd pre", k._conv_bwd_pre_kernel, {"K": 4, "BT": 128, "BD": 16, "NEAR": True}, {"x_ptr": "*bf16", "gu_ptr": "*bf16"}, 4),
        ("conv bwd dx", k._conv_bwd_dx_kernel, {"K": 4, "BT": 128, "BD": 16, "NEAR": True}, {"dx_ptr": "*bf16"}, 4),
        # the fused ToM layer's scans run ungated, and its gate is a kernel of its own
        ("bwd grad, ungated", k._bwd_grad_kernel, {**tile, **flags, "HAS_D": True, "HAS_Z": False, "MIRROR": False}, bf16_inputs, 1),
        ("bwd grad, ungated, mirrored", k._bwd_grad_kernel, {**tile, **flags, "HAS_D": True, "HAS_Z": False, "MIRROR": True}, bf16_inputs, 1),
        ("gate fwd", k._gate_fwd_kernel, {"R": 3, "BT": 128, "BD": 16}, {"y_ptr": "*bf16", "z_ptr": "*bf16", "ysum_ptr": "*bf16", "out_ptr": "*bf16"}, 4),
        ("gate bwd", k._gate_bwd_kernel, {"BT": 128, "BD": 16}, {n: "*bf16" for n in ("g_ptr", "ysum_ptr", "z_ptr", "gy_ptr", "dz_ptr", "out_ptr")}, 4),
    ]


def _norm_cases():
    from segresmamba.models import group_norm_kernels as k

    bf16 = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16"}
    cases = [
        ("stats", k._stats_kernel, {"CHUNK": k.CHUNK, "BLOCK": k.BLOCK}, bf16, 4),
        ("finalize", k._finalize_kernel, {"BLOCK_S": 16}, None, 4),
        ("grad sums", k._grad_sums_kernel, {"CHUNK": k.CHUNK, "BLOCK": k.BLOCK}, bf16, 4),
        ("grad input", k._grad_input_kernel, {"BLOCK": k.BLOCK}, bf16, 4),
    ]
    for has_w in (True, False):
        cases.append((f"apply w={has_w}", k._apply_kernel, {"HAS_W": has_w, "HAS_B": has_w, "BLOCK": k.BLOCK}, bf16, 4))
        for block_s in (16, k.COEFF_BLOCK):
            cases.append((f"grad coeff w={has_w} splits<={block_s}", k._grad_coeff_kernel, {"HAS_W": has_w, "BLOCK_S": block_s}, None, 4))
    # a group of one channel and one split: the sizes a GPU call turns into constants
    cases.append(("grad coeff CG=SPLITS=1", k._grad_coeff_kernel, {"HAS_W": False, "BLOCK_S": 16, "CG": 1, "SPLITS": 1}, None, 4))
    # the channels-last twins, at the tiles of a 48-channel map (64 channel lanes) and of a 16-channel one
    for channels in (48, 16):
        rows, bs, bc, _ = k._cl_reduction_tile(channels, 64**3)
        tile = {"ROWS": rows, "BS": bs, "BC": bc}
        ew_bs, ew_bc = k._cl_blocks(channels, 2 * k.BLOCK)
        cases += [
            (f"stats cl C={channels}", k._stats_cl_kernel, tile, bf16, 4),
            (f"grad sums cl C={channels}", k._grad_sums_cl_kernel, tile, bf16, 4),
            (f"apply cl C={channels}", k._apply_cl_kernel, {"HAS_W": True, "HAS_B": True, "BS": ew_bs, "BC": ew_bc}, bf16, 4),
            (f"grad input cl C={channels}", k._grad_input_cl_kernel, {"BS": ew_bs, "BC": ew_bc}, bf16, 4),
        ]
    return cases


def _token_norm_cases():
    from segresmamba.ssm.triton import token_norm as k

    cases = []
    for channels in (48, 384):  # the ToM widths of SegResMamba's first and last stage
        block_c, block_t, warps = k._launch_tile(channels)
        for channels_last in (False, True):
            tile = {"BC": block_c, "BT": block_t, "CHANNELS_LAST": channels_last}
            layout = " channels-last" if channels_last else ""
            cases += [
                (f"token norm fwd C={channels}{layout}", k._token_norm_fwd_kernel, tile, {"x_ptr": "*bf16", "y_ptr": "*bf16"}, warps),
                (f"token norm bwd C={channels}{layout}", k._token_norm_bwd_kernel, tile,
                 {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16"}, warps),
            ]
    return cases


def _upsample_cases():
    from segresmamba.models import upsample_kernels as k

    cases = []
    # a SegResMamba decoder level's channel block and one of a narrow net (channels-last), and the NCDHW tile
    for channels, channels_last in ((48, True), (8, True), (48, False)):
        bs, bc = k._blocks(channels, channels_last)
        tile = {"BLOCK_S": bs, "BLOCK_C": bc}
        name = f"C={channels}{' channels-last' if channels_last else ''}"
        cases += [
            (f"upsample fwd {name}", k._fwd_kernel, tile, {"x_ptr": "*bf16", "y_ptr": "*fp32"}, 4),
            (f"upsample bwd {name}", k._bwd_kernel, tile, {"g_ptr": "*fp32", "dx_ptr": "*bf16"}, 4),
        ]
    return cases


CASES = _scan_cases() + _norm_cases() + _token_norm_cases() + _upsample_cases()


@pytest.mark.parametrize("name,kernel,constexprs,pointer_types,num_warps", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(name, kernel, constexprs, pointer_types, num_warps):
    compiled = compile_for_sm90(kernel, constexprs, pointer_types, num_warps)
    assert compiled.asm.get("cubin"), f"{name}: no cubin"


def test_longest_loop_is_the_body_of_the_longest_backward_branch():
    from perf.kernel_resources import longest_loop

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        "        /*0010*/                   FADD R2, R2, R3 ;",
        "        /*0020*/               @P0 BRA `(.L_x_0) ;",
        ".L_x_1:",
        "        /*0030*/                   SHFL.BFLY PT, R4, R4, 0x1, 0x1f ;",
        "        /*0040*/                   FFMA R5, R4, R4, R5 ;",
        "        /*0050*/                   LDL R6, [R1] ;",
        "        /*0060*/              @!P1 BRA `(.L_x_1) ;",
        "        /*0070*/                   BRA `(.L_x_2) ;",  # forward branch: not a loop
        ".L_x_2:",
        "        /*0080*/                   EXIT ;",
        ".L_x_3:",
        "        /*0090*/                   BRA `(.L_x_3);",  # the trap after the exit: not a loop either
    ])
    body = longest_loop(sass)
    assert [line.split()[1] for line in body] == ["SHFL.BFLY", "FFMA", "LDL", "@!P1"]
    assert longest_loop("        /*0000*/                   EXIT ;") == []
    assert longest_loop(".L_x_0:\n        /*0000*/                   BRA `(.L_x_0);") == []


def test_kernel_resources_report_counts_every_scan_kernel(tmp_path):
    from perf import kernel_resources

    dest = kernel_resources.report(tmp_path)
    assert dest.name == f"kernel_resources_triton-{triton.__version__}.md"
    rows = [line for line in dest.read_text().splitlines() if line.startswith("| ") and "registers" not in line]
    assert len(rows) == len(kernel_resources.scan_cases())
    bwd = next(r for r in rows if r.startswith("| bwd grad, T=64 "))
    cells = [c.strip() for c in bwd.strip("|").split("|")]
    registers, total, loop_total, shuffles = int(cells[2]), int(cells[5]), int(cells[6]), int(cells[7])
    assert 0 < registers <= 255 and total > loop_total > 100 and 0 < shuffles < loop_total  # its scans shuffle across lanes
    assert f"Triton {triton.__version__}" in dest.read_text()


def test_scan_ablations_apply_to_the_kernel_source_and_compile():
    """Every ablation's replacement text is still in the kernel (else the list drifted), and an edited kernel compiles."""
    from perf import scan_ablation
    from perf.kernel_resources import BF16_INPUTS, resources

    kernels = {name: scan_ablation.edited_kernel(name) for name in scan_ablation.ABLATIONS}
    constexprs = {"T": 64, "BN": 16, "HAS_BIAS": True, "SOFTPLUS": True, "HAS_D": True, "HAS_Z": True, "MIRROR": False}
    as_is = resources(compile_for_sm90(kernels["as is"], constexprs, BF16_INPUTS, 1))
    no_scans = resources(compile_for_sm90(kernels["no scans"], constexprs, BF16_INPUTS, 1))
    assert no_scans["loop_shfl"] < as_is["loop_shfl"] and no_scans["loop_instructions"] < as_is["loop_instructions"]


def test_a_stale_ablation_is_refused(monkeypatch):
    from perf import scan_ablation

    monkeypatch.setitem(scan_ablation.ABLATIONS, "stale", ("a line that is gone", [("no such line in the kernel", "")]))
    with pytest.raises(ValueError, match="no longer in"):
        scan_ablation.edited_kernel("stale")


def test_kernel_report_without_triton_says_what_is_missing():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys; sys.modules['triton'] = None; import perf.kernel_resources"
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert run.returncode == 1 and "perf.kernel_resources needs Triton" in run.stderr


def test_triton_ab_builds_each_tom_launch_as_the_jit_would_and_packs_its_parameters(tmp_path):
    """`perf.triton_ab build` records the fused ToM layer's launches on the CPU (not run) and compiles each one for
    sm_90 with the JIT's own specialisation; the GPU side's parameter packing follows the built signature and
    refuses arguments that break what the cubin assumes."""
    import ctypes
    import json

    import torch

    from perf import triton_ab

    index = triton_ab.build(tmp_path, side=16)
    names = [e["name"] for e in index]
    assert names == ["_token_norm_fwd_kernel", "_conv_fwd_kernel", "_fwd_chunk_state_kernel", "_carry_kernel", "_fwd_output_kernel",
                     "_gate_fwd_kernel", "_gate_bwd_kernel", "_conv_fwd_kernel",  # the backward recomputes u
                     "_bwd_chunk_state_kernel", "_carry_kernel", "_bwd_grad_kernel",
                     "_conv_bwd_pre_kernel", "_conv_bwd_dx_kernel", "_token_norm_bwd_kernel"]
    assert all((tmp_path / e["cubin"]).stat().st_size > 1000 for e in index)
    # as launched, the oriented conv reads x along its contiguous channels and writes u along its contiguous tokens
    # 16 bytes at a time: the sizes it masks with (L, D_CH) specialise on their divisibility by 16
    import subprocess

    from perf.kernel_resources import _nvidia_tool

    conv = tmp_path / next(e["cubin"] for e in index if e["name"] == "_conv_fwd_kernel")
    sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", str(conv)], capture_output=True, text=True, check=True).stdout
    assert "LDG.E.128" in sass and "STG.E.128" in sass
    assert json.loads((tmp_path / "index.json").read_text())["side"] == 16
    launches = triton_ab.tom_launches(torch.device("cpu"), run=False, side=16)
    grad = next(i for i, e in enumerate(index) if e["name"] == "_bwd_grad_kernel")
    entry, launch = index[grad], launches[grad]
    params = triton_ab.kernel_params(entry, launch)
    assert len(params) == sum(kind != "constexpr" for kind in entry["signature"]) + 2  # + the two scratch pointers
    assert isinstance(params[0], ctypes.c_uint64) and params[0].value == launch["args"][0].data_ptr()
    misaligned = dict(launch, args=(launch["args"][0].view(-1)[1:],) + tuple(launch["args"][1:]))  # 2 bytes off
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        triton_ab.kernel_params(entry, misaligned)
    as_fp32 = dict(launch, args=(launch["args"][0].float(),) + tuple(launch["args"][1:]))  # the cubin reads bf16
    with pytest.raises(ValueError, match="the cubin reads bf16"):
        triton_ab.kernel_params(entry, as_fp32)
    one = next(int(i) for i, v in entry["constants"].items() if v == 1 and not isinstance(v, bool))
    changed = list(launch["args"])
    changed[one] = 2
    with pytest.raises(ValueError, match="built with it = 1"):
        triton_ab.kernel_params(entry, dict(launch, args=tuple(changed)))


def test_triton_ab_launch_marshals_a_grid_and_parameters_for_the_driver():
    """What `perf.triton_ab` hands cuLaunchKernel: a 3-D grid (a 2-D Triton grid padded with 1), the block, the
    shared memory and an array of pointers to each parameter's value."""
    import ctypes

    from perf import triton_ab

    calls = []

    class FakeCuda:
        def cuLaunchKernel(self, *args):
            calls.append(args)
            return 0

    driver = triton_ab._Driver.__new__(triton_ab._Driver)
    driver.lib = FakeCuda()
    params = [ctypes.c_uint64(1234), ctypes.c_int32(-7), ctypes.c_float(0.5)]
    driver.launch(ctypes.c_void_p(99), (48, 3), 128, 4096, params, stream=0)
    (args,) = calls
    assert [a.value for a in args[1:8]] == [48, 3, 1, 128, 1, 1, 4096]
    holders = args[9]
    assert len(holders) == 3
    assert ctypes.cast(holders[0], ctypes.POINTER(ctypes.c_uint64)).contents.value == 1234
    assert ctypes.cast(holders[1], ctypes.POINTER(ctypes.c_int32)).contents.value == -7
    assert ctypes.cast(holders[2], ctypes.POINTER(ctypes.c_float)).contents.value == 0.5
    driver.lib.cuLaunchKernel = lambda *args: 700  # CUDA_ERROR_ILLEGAL_ADDRESS
    with pytest.raises(RuntimeError, match="cuLaunchKernel failed with CUDA driver error 700"):
        driver.launch(ctypes.c_void_p(99), (1,), 32, 0, params, stream=0)


def test_triton_ab_runs_both_builds_from_the_same_bytes():
    """`largest_difference` puts back every byte the first build's launch changed before the second runs, for every
    argument of every recorded ToM launch, broadcast views (the branches' shared output gradient) among them; and
    it reports what the two leave behind, relative to the first."""
    import torch

    from perf import triton_ab

    def as_bytes(t):
        return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())

    launches = triton_ab.tom_launches(torch.device("cpu"), run=False, side=16)
    assert any(0 in t.stride() for launch in launches for t in triton_ab._tensors(launch))
    for launch in launches:
        tensors = triton_ab._tensors(launch)
        start = [as_bytes(t).clone() for t in tensors]

        def zero_all():
            for t in tensors:
                as_bytes(t).zero_()

        def check_restored_then_zero():
            assert all(torch.equal(as_bytes(t), s) for t, s in zip(tensors, start)), launch["name"]
            zero_all()

        assert triton_ab.largest_difference(zero_all, check_restored_then_zero, tensors) == 0.0
    out = torch.zeros(4)
    step = iter([1.0, 1.5])
    assert triton_ab.largest_difference(lambda: out.add_(next(step)), lambda: out.add_(next(step)), [out]) == 0.5
