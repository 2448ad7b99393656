"""perf.graph_memory: the graphs' pool against its live tensors, from an allocator snapshot (CPU, synthetic snapshots)."""

import pytest

from perf import graph_memory
from perf.graph_memory import pool_summary, report, source_of

MIB = 2**20


def frames(line, name="forward", filename="/x/src/segresmamba/ssm/triton/fused_tom.py"):
    return [{"filename": "/usr/lib/python3/threading.py", "line": 1, "name": "run"},
            {"filename": filename, "line": line, "name": name}]


def event(action, addr, size, source=None):
    return {"action": action, "addr": addr, "size": size, "frames": frames(source) if source else []}


def snapshot(trace, pool_segments, default_segments=()):
    segments = [{"address": a, "total_size": n, "allocated_size": used, "segment_pool_id": (1, 2), "device": 0}
                for a, n, used in pool_segments]
    segments += [{"address": a, "total_size": n, "allocated_size": used, "segment_pool_id": (0, 0), "device": 0}
                 for a, n, used in default_segments]
    return {"segments": segments, "device_traces": [trace]}


def test_peak_of_the_pools_live_tensors_and_their_sources():
    pool, other = 1000 * MIB, 5000 * MIB
    trace = [
        event("segment_alloc", pool, 100 * MIB),
        event("alloc", pool, 40 * MIB, 10),
        event("alloc", other, 500 * MIB, 11),  # the default pool's: not counted
        event("alloc", pool + 40 * MIB, 30 * MIB, 12),
        event("free_requested", pool, 40 * MIB),
        event("free_completed", pool, 40 * MIB),
        event("alloc", pool, 20 * MIB, 13),
        event("alloc", pool + 70 * MIB, 25 * MIB),  # from PyTorch's C++: no Python frame
    ]
    s = pool_summary(snapshot(trace, [(pool, 100 * MIB, 30 * MIB)], [(other, 600 * MIB, 500 * MIB)]))
    assert s.segments == [100 * MIB] and s.free_after == 70 * MIB
    # alive together: 30 (line 12) + 20 (line 13) + 25 (C++) = 75 MiB > the earlier 40 + 30
    assert s.peak_live == 75 * MIB and s.peak_event == 7 and s.events == 8
    assert s.live_at_peak[source_of(frames(12))] == 30 * MIB and s.live_at_peak[""] == 25 * MIB
    assert s.count_at_peak[source_of(frames(13))] == 1
    lines = report(s, {"max_allocated": 600 * MIB, "reserved": 700 * MIB}, "t", "f")
    assert "| 1 | 0.10 | 0.07 | 0.07 | 0.59 | 0.68 |" in lines
    assert any("(inside PyTorch)" in line for line in lines) and any("fused_tom.py:12:forward" in line for line in lines)


def test_memory_held_at_the_pools_address_before_the_pool_existed_is_not_the_pools():
    """The eager warm-up's segment can sit at the virtual address the pool gets once that segment is released."""
    addr = 1000 * MIB
    trace = [
        event("segment_alloc", addr, 200 * MIB),  # the warm-up's (default pool)
        event("alloc", addr, 150 * MIB, 1),
        event("free_requested", addr, 150 * MIB),
        event("segment_free", addr, 200 * MIB),  # released when the capture begins
        event("segment_alloc", addr, 100 * MIB),  # the graphs' pool, same address
        event("alloc", addr, 60 * MIB, 2),
    ]
    s = pool_summary(snapshot(trace, [(addr, 100 * MIB, 60 * MIB)]))
    assert s.peak_live == 60 * MIB and s.peak_event == 5
    assert list(s.live_at_peak) == [source_of(frames(2))]


def test_source_names_the_suites_innermost_frames():
    fs = [{"filename": "/site/torch/autograd/function.py", "line": 5, "name": "apply"},
          {"filename": "/r/src/segresmamba/ssm/triton/autograd.py", "line": 208, "name": "scan_backward"},
          {"filename": "/r/src/segresmamba/ssm/triton/fused_tom.py", "line": 330, "name": "backward"}]
    assert source_of(fs) == "autograd.py:208:scan_backward < fused_tom.py:330:backward"
    assert source_of(fs, depth=1) == "autograd.py:208:scan_backward"
    assert source_of([]) == ""


def test_cli_refuses_without_a_gpu_and_unknown_models(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        graph_memory.main(["--model", "nope", "--out", str(tmp_path)])
    monkeypatch.setattr(graph_memory.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a GPU; CUDA is not available"):
        graph_memory.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
