"""Benchmark tooling on the CPU: profiler, sweep runner (resume, error rows), aggregation and plots."""

import json
from pathlib import Path

import pandas as pd
import torch
import pytest
import yaml

from segresmamba.bench import aggregate, efficiency, sweep
from segresmamba.bench.runs import runs_text


def test_profiler_cpu_rows(tmp_path):
    written = efficiency.main(["--configs", "spleen", "--models", "unet", "segresnet", "--patch", "32", "--out", str(tmp_path)])
    csv = next(p for p in written if p.suffix == ".csv")
    df = pd.read_csv(csv)
    assert list(df.model) == ["unet", "segresnet"]
    assert (df.params_m > 0).all() and (df.gmacs > 0).all() and (df.cpu_infer_patch_s > 0).all()
    assert df.uncounted_ops.str.contains("aten::").all()
    for col in ("train_peak_gib_fp32", "step_ms_bf16", "infer_volume_s_fp32"):
        assert (df[col] == "not measured").all(), col
    assert df.paper_macs_g.notna().any()  # the paper's columns sit beside ours
    assert "CPU" in df.device.iloc[0] and df.git_sha.notna().all()
    # a second invocation adds its rows and keeps the others
    efficiency.main(["--configs", "spleen", "--models", "unet", "--patch", "32", "--out", str(tmp_path), "--skip-macs"])
    assert sorted(pd.read_csv(csv).model) == ["segresnet", "unet"]


def test_profiler_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit):
        efficiency.main(["--models", "nosuchnet", "--out", str(tmp_path)])


def test_scan_is_counted_and_heavy_uncounted_ops_refused():
    import torch

    from segresmamba.profiling import UncountedOpError, count_macs
    from segresmamba.ssm import TriOrientedMamba

    layer = TriOrientedMamba(8)
    macs = count_macs(layer, torch.zeros(1, 8, 4, 4, 4))
    scan = macs.by_operator["PythonOp.SelectiveScanFn"]
    assert scan == 3 * 4.5 * 1 * 64 * 16 * 16  # three directions x 4.5 x B x L x d_inner x d_state

    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(torch.nn.Module):
        def forward(self, x):
            return Opaque.apply(x)

    with pytest.raises(UncountedOpError, match="PythonOp.Opaque"):
        count_macs(Net(), torch.zeros(2, 3))


def _write_sweep(tmp_path: Path, models: list[str]) -> Path:
    spec = {
        "name": f"test-{tmp_path.name}",
        "protocol": "test: 1 epoch x 2 steps, 32^3",
        "data_config": "configs/data/brats_phantom.yaml",
        "phantom": {"kind": "brats", "out": str(tmp_path / "phantom"), "cases": 5, "size": 32, "seed": 0},
        "data_args": {"root": str(tmp_path / "phantom"), "patch_size": 32, "batch_size": 1, "cache_rate": 0.0},
        "models": models,
        "folds": [0, 1],
        "out": str(tmp_path / "results"),
        "trainer_args": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False},
        "energy_country": None,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_runs_records_errors_and_resumes(tmp_path, capsys):
    # segresmamba needs patches >= 48: at 32 it fails, which must become an error row, not a crash
    path = _write_sweep(tmp_path, ["unet", "segresmamba"])
    assert sweep.main([str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    out = tmp_path / "results"
    for fold in (0, 1):
        ok = json.loads((out / "unet" / f"fold{fold}" / "metrics.json").read_text())
        assert ok["status"] == "ok" and ok["fold"] == fold
        assert 0.0 <= ok["test"]["test/dice_mean"] <= 1.0
        assert "best-" in ok["test"]["ckpt_path"]  # tested on the best-validation checkpoint
        assert Path(ok["run_dir"]).is_relative_to(tmp_path / "runs")  # logs and checkpoints where --runs-dir says
        assert int(ok["cpu_threads"]) >= 1  # runs side by side must not each spin one OpenMP thread per core
        # a sweep keeps only the best weights: no last.ckpt, no optimizer state
        ckpts = sorted(Path(ok["test"]["ckpt_path"]).parent.glob("*.ckpt"))
        assert [c.name.startswith("best-") for c in ckpts] == [True]
        assert "optimizer_states" not in torch.load(ckpts[0], map_location="cpu", weights_only=False)
        assert 0.0 <= ok["fit"]["untrained"]["val/dice_mean"] <= 1.0 and ok["fit"]["untrained"]["batches"] == "all"
        assert ok["fit"]["best"]["val/dice_mean"] is not None and ok["fit"]["last"] is not None
        assert ok["data"]["provenance"] == "synthetic" and ok["provenance"]["git_sha"]
        assert ok["paper_calculator_co2_kg"] > 0
        bad = json.loads((out / "segresmamba" / f"fold{fold}" / "metrics.json").read_text())
        assert bad["status"] == "error" and ">= 48" in bad["error"]
    capsys.readouterr()

    # resume: nothing left to do
    sweep.main([str(path)])
    assert capsys.readouterr().out.count("skip ") == 4
    # an interrupted sweep: one finished run lost -> only that one runs again
    (out / "unet" / "fold1" / "metrics.json").unlink()
    sweep.main([str(path)])
    text = capsys.readouterr().out
    assert text.count("skip ") == 3 and "[1/1] unet fold 1: ok" in text

    # and the aggregation of what it produced
    aggregate.main([str(out)])
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.model) == {"unet", "segresmamba"}
    assert int(summary.set_index("model").loc["segresmamba", "failed"]) == 2
    assert "untrained val Dice" in (out / "summary.md").read_text()
    assert "segresmamba fold 0" in (out / "summary.md").read_text()


def test_sweep_stops_before_training_on_missing_data(tmp_path):
    path = _write_sweep(tmp_path, ["unet"])
    spec = yaml.safe_load(path.read_text())
    spec.pop("phantom")
    spec["data_args"]["root"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="data check failed before training.*nowhere"):
        sweep.main([str(path)])
    assert not (tmp_path / "results").exists()


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [unet]\n")
    with pytest.raises(SystemExit, match="missing keys"):
        sweep.main([str(bad)])
    with pytest.raises(SystemExit, match="not found"):
        sweep.main([str(tmp_path / "absent.yaml")])


def _fake_record(model: str, fold: int, dice: float, mem: float) -> dict:
    return {
        "model": model, "fold": fold, "status": "ok", "protocol": "fixture",
        "data": {"dataset": "brats2021", "provenance": "synthetic"},
        "provenance": {"device": "NVIDIA H200", "precision": "bf16-mixed", "git_sha": "abc123"},
        "params": 1_000_000,
        "fit": {"epochs": 10, "wall_time_s": 100.0, "median_step_ms": 50.0, "peak_memory_allocated_gib": mem,
                "energy": {"energy_kwh": 0.01, "co2_kg": 0.004}, "best": {"val/dice_mean": dice, "epoch": 9}},
        "test": {"test/dice_mean": dice, "test/dice_TC": dice, "test/dice_WT": dice, "test/dice_ET": dice},
        "paper_calculator_co2_kg": 0.004,
    }


def test_aggregation_and_plots_from_fixtures(tmp_path):
    for model, base, mem in (("segresmamba", 0.8, 3.6), ("swinunetr", 0.7, 11.4)):
        for fold in (0, 1):
            d = tmp_path / model / f"fold{fold}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_fake_record(model, fold, base + 0.02 * fold, mem)))
    aggregate.main([str(tmp_path)])
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("model")
    assert summary.loc["segresmamba", "test_dice_mean_mean"] == pytest.approx(0.81)
    assert summary.loc["swinunetr", "folds"] == 2
    md = (tmp_path / "summary.md").read_text()
    assert "| segresmamba | 2 | 0.810 ± 0.014" in md and "synthetic" in md and "NVIDIA H200" in md
    side = (tmp_path / "paper_vs_ours.md").read_text()
    assert "| segresmamba | 0.8839 | 0.810 ± 0.014 |" in side
    for name in ("fig2_dice_vs_memory.png", "fig3_dice_vs_co2.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_sweep_through_submitit_local_executor(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = _write_sweep(tmp_path, ["unet"])
    spec = yaml.safe_load(path.read_text())
    spec["folds"] = [0]
    path.write_text(yaml.safe_dump(spec))
    args = [str(path), "--launcher", "submitit", "--gpus-per-job", "0", "--cpus-per-job", "1", "--mem-gb", "4",
            "--timeout-min", "20", "--submitit-folder", str(tmp_path / "jobs")]
    assert sweep.main(args) == 0
    assert "submitit: local executor" in capsys.readouterr().out
    record = json.loads((tmp_path / "results" / "unet" / "fold0" / "metrics.json").read_text())
    assert record["status"] == "ok" and 0.0 <= record["test"]["test/dice_mean"] <= 1.0
    assert list((tmp_path / "jobs").glob("*_log.out"))  # submitit's job logs
    sweep.main(args)  # the same resume logic: nothing resubmitted
    assert "skip unet fold 0: finished (ok)" in capsys.readouterr().out


def test_profiler_spreads_models_over_worker_processes(tmp_path):
    """The multi-GPU path: one worker process per device id, each profiling its share (here on the CPU)."""
    jobs = [("unet", "spleen"), ("segresnet", "spleen"), ("unet", "brats")]
    out = tmp_path / "not" / "yet"  # the workers' folder is made for them
    rows = efficiency._run_workers(jobs, ["0", "1"], ["--cpu", "--patch", "32", "--skip-macs", "--skip-cpu-times"], out)
    assert sorted((r["model"], r["config"]) for r in rows) == sorted(jobs)
    assert all(r["params_m"] > 0 and "error" not in r for r in rows)
    assert all(r["train_peak_gib_fp32"] == "not measured" for r in rows)
    assert not list(out.glob(".rows-*.jsonl"))  # worker files are collected and removed


def test_model_step_table_from_an_efficiency_table(tmp_path):
    from perf import model_step

    table = Path(__file__).resolve().parents[1] / "results/efficiency/nvidia-h200/brats.csv"
    model_step.main(["--table", str(table), "--out", str(tmp_path), "--models", "segresmamba", "swinunetr"])
    df = pd.read_csv(tmp_path / "model_step.csv")
    assert len(df) == 4 and set(df.precision) == {"bf16", "fp32"}
    source = pd.read_csv(table).set_index("model")
    row = df[(df.model == "segresmamba") & (df.precision == "bf16")].iloc[0]
    assert row.step_ms == pytest.approx(float(source.loc["segresmamba", "step_ms_bf16"]), rel=1e-3)
    assert row.device == "NVIDIA H200" and row.git_sha == source.loc["segresmamba", "git_sha"]


def test_ddp_check_two_gloo_processes_vs_one(tmp_path):
    """The DDP check as on a 2-GPU host, on 2 CPU processes (gloo): same init, Dice compared to the seed spread."""
    from perf import ddp_check
    from segresmamba.data import write_phantoms

    write_phantoms.write_brats_phantom(tmp_path / "phantom", cases=5, size=32, seed=0)
    out = tmp_path / "ddp"
    rc = ddp_check.main([
        "--accelerator", "cpu", "--model", "unet", "--devices", "2", "--epochs", "1", "--seeds", "0", "1", "--out", str(out),
        "--", "--data.init_args.root", str(tmp_path / "phantom"), "--data.init_args.patch_size", "32",
        "--data.init_args.cache_rate", "0", "--trainer.limit_train_batches", "2",
    ])
    assert rc == 0
    table = pd.read_csv(out / "ddp.csv").set_index("run")
    assert list(table.index) == ["ddp2_seed0", "one_seed0", "one_seed1"]
    assert (table.status == "ok").all() and list(table.per_device_batch) == [1, 2, 2]
    # same seed, same initial weights: the untrained network scores the same on 2 ranks as on one
    assert table.loc["ddp2_seed0", "untrained_val_dice_mean"] == pytest.approx(table.loc["one_seed0", "untrained_val_dice_mean"], abs=1e-6)
    assert table.loc["ddp2_seed0", "global_steps"] == table.loc["one_seed0", "global_steps"] == 2
    text = (out / "ddp.md").read_text()
    assert "2 devices vs 1" in text and ("**same:" in text or "**DIFFERENT:" in text)


def test_ddp_check_refuses_bad_arguments(tmp_path):
    from perf import ddp_check

    with pytest.raises(SystemExit, match="--devices must be >= 2"):
        ddp_check.main(["--devices", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not divisible"):
        ddp_check.main(["--accelerator", "cpu", "--devices", "2", "--global-batch", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no configs/model/nonet.yaml"):
        ddp_check.main(["--accelerator", "cpu", "--model", "nonet", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs 2 GPUs"):
        ddp_check.main(["--accelerator", "gpu", "--devices", "2", "--out", str(tmp_path)])


def test_gpu_sweeps_spread_over_the_gpus_they_find(tmp_path, monkeypatch):
    gpu_sweep = sweep.Sweep.load(sweep.ROOT / "configs/bench/brats_synthetic_gpu.yaml")
    cpu_sweep = sweep.Sweep.load(sweep.ROOT / "configs/bench/quick.yaml")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep.resolve_gpus(None, gpu_sweep) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert sweep.resolve_gpus(None, gpu_sweep) == ["4", "6"]  # the ids this process was given
    assert sweep.resolve_gpus("1", gpu_sweep) == ["1"]  # named ones win
    assert sweep.resolve_gpus(None, cpu_sweep) == [None]  # a CPU sweep stays one run at a time
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep.resolve_gpus(None, gpu_sweep) == [None]


def test_scan_mac_handle_reads_d_state_from_the_last_dim_of_A():
    # the Triton scan takes A as (branches, channels, d_state); mamba-ssm's and ours as (channels, d_state)
    from segresmamba.profiling.macs import _scan_macs

    class Value:  # what fvcore's jit handles read a shape from
        def __init__(self, *shape):
            self.shape = shape

        def type(self):
            return self

        def sizes(self):
            return list(self.shape)

        def isCompleteTensor(self):
            return True

    u = Value(3, 96, 1000)
    assert _scan_macs([u, u, Value(96, 16)], []) == _scan_macs([u, u, Value(3, 96, 16)], []) == int(4.5 * 3 * 96 * 1000 * 16)


def test_efficiency_header_names_the_runs_of_merged_rows():
    one = pd.DataFrame({"model": ["unet", "nnunet"], "git_sha": ["aaa1111", "aaa1111"]})
    assert runs_text(one) == "git aaa1111"
    merged = pd.DataFrame({"model": ["unet", "nnunet", "segresmamba"], "git_sha": ["aaa1111", "aaa1111", "bbb2222"]})
    assert runs_text(merged) == "rows from several runs: git aaa1111: unet, nnunet; git bbb2222: segresmamba"


def test_scan_tune_picks_fastest_then_lightest():
    from perf import scan_bench

    # 1 is fastest; 0 is within 2 % of it and needs less memory; 2 needs the least but is too slow
    assert scan_bench.pick_setting({0: 10.0, 1: 9.9, 2: 12.0}, {0: 1.0, 1: 2.0, 2: 0.5}) == 0
    assert scan_bench.pick_setting({0: 10.0, 1: 9.0}, {0: 1.0, 1: 2.0}) == 1
    # a setting that failed (inf) never wins, whatever its memory
    assert scan_bench.pick_setting({0: float("inf"), 1: 5.0}, {0: 0.1, 1: 3.0}) == 1
    # the library's default launch setting is the first one measured
    assert scan_bench.TUNE_VARIANTS[0] == {k: scan_bench.tuning.TUNING[k] for k in scan_bench._TUNE_BASE}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_step_profile_refuses_a_cpu():
    from perf import step_profile

    with pytest.raises(SystemExit, match="needs a GPU"):
        step_profile.main(["--model", "segresmamba"])


def test_efficiency_refuses_cuda_graphs_on_a_cpu(capsys):
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--cpu", "--cuda-graphs", "--models", "unet"])
    assert "--cuda-graphs needs a GPU" in capsys.readouterr().err


def test_model_step_table_holds_eager_and_graphed_rows(tmp_path):
    from perf import model_step

    source = Path(__file__).resolve().parents[1] / "results/perf/model_step_source"
    tables = [str(source / mode / "nvidia-h200/brats.csv") for mode in ("eager", "cuda_graphs")]
    model_step.main(["--table", *tables, "--out", str(tmp_path), "--models", "segresmamba", "swinunetr"])
    df = pd.read_csv(tmp_path / "model_step.csv")
    mine = df[(df.model == "segresmamba") & (df.precision == "bf16")].set_index("cuda_graphs")
    assert set(mine.index) == {"-", "7 ToM layers"} and (df[df.model == "swinunetr"].cuda_graphs == "-").all()
    assert mine.loc["7 ToM layers", "step_ms"] < mine.loc["-", "step_ms"]
    assert "7 ToM layers" in (tmp_path / "model_step.md").read_text()
    # tables of two configs are refused
    (tmp_path / "spleen.csv").write_text(Path(tables[0]).read_text())
    with pytest.raises(SystemExit, match="different configs"):
        model_step.main(["--table", tables[0], str(tmp_path / "spleen.csv"), "--out", str(tmp_path)])
