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
    assert list(df.model) == ["unet", "segresnet"] and (df.recipe == "paper").all()
    assert (df.params_m > 0).all() and (df.gmacs > 0).all() and (df.cpu_infer_patch_s > 0).all() and (df.cpu_step_s > 0).all()
    assert df.uncounted_ops.str.contains("aten::").all()
    for col in ("train_peak_gib_fp32", "step_ms_bf16", "infer_volume_s_fp32"):
        assert (df[col] == "not measured").all(), col
    assert df.paper_macs_g.notna().any()  # the paper's columns sit beside ours
    assert "CPU" in df.device.iloc[0] and df.git_sha.notna().all()
    # its MACs chart is drawn beside it; a CPU table has no peaks to chart
    assert csv.with_name("macs_spleen.png") in written and csv.with_name("macs_spleen.png").stat().st_size > 0
    assert not csv.with_name("memory_spleen.png").exists()
    # a second invocation adds its rows and keeps the others
    efficiency.main(["--configs", "spleen", "--models", "unet", "--patch", "32", "--out", str(tmp_path), "--skip-macs", "--skip-cpu-times"])
    assert sorted(pd.read_csv(csv).model) == ["segresnet", "unet"]


def test_efficiency_charts_of_measured_figures_only(tmp_path):
    rows = pd.DataFrame({"model": ["unet", "nnunet"], "device": ["NVIDIA H200"] * 2, "torch": ["2.11.0"] * 2, "git_sha": ["a" * 40] * 2,
                         "gmacs": [13.4, 484.0], "train_peak_gib_fp32": [0.58, "not measured"], "train_peak_gib_bf16": [0.44, 2.68]})
    rows.to_csv(tmp_path / "brats.csv", index=False)
    assert efficiency.charts(tmp_path / "brats.csv", tmp_path) == [tmp_path / "macs_brats.png", tmp_path / "memory_brats.png"]
    rows.assign(gmacs=None, train_peak_gib_fp32="not measured", train_peak_gib_bf16="not measured").to_csv(tmp_path / "btcv.csv", index=False)
    assert efficiency.charts(tmp_path / "btcv.csv", tmp_path) == []


def test_profiler_times_the_tasks_training_step(monkeypatch):
    """The profiler's step is SegmentationTask.training_step of the configured model, deep supervision included."""
    from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
    from segresmamba.data.spec import get_dataset_spec
    from segresmamba.task import SegmentationTask

    calls = []
    real = SegmentationTask.training_step
    monkeypatch.setattr(SegmentationTask, "training_step", lambda self, batch, i: calls.append(i) or real(self, batch, i))
    row = efficiency.profile_model("unet", "spleen", patch=32, cpu=True, macs=False)
    assert "error" not in row and row["cpu_step_s"] > 0
    assert calls == [0, 1]  # one warm-up and one timed step, both through the task
    # the net is built from configs/model/nnunet.yaml and the recipe: nnunet's recipe trains the deep-supervision heads
    spec = get_dataset_spec("spleen")
    task = build_task("nnunet", spec, patch=32, recipe="nnunet")
    assert task.hparams.net_kwargs["base_filters"] == 32  # the model YAML's settings, not the factory's defaults
    step = TrainingStep(task, "fp32", torch.device("cpu"))
    assert isinstance(step.optimizer, torch.optim.SGD) and step.clip_norm == 12.0  # the recipe's optimiser
    step.optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients of the step to look at them
    step(synthetic_batch(spec, (32, 32, 32), torch.device("cpu")))
    missing = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"parameters the step does not train: {missing[:5]}"
    heads = [n for n, _ in task.net.named_parameters() if n.startswith("deep_supervision_heads.")]
    assert heads  # the deep-supervision heads exist and got gradients above
    with pytest.raises(ValueError, match="needs a patch"):
        efficiency.profile_model("segresmamba", "spleen", patch=32, cpu=True)  # refused before anything is built


def test_profiler_checks_every_patch_before_profiling(tmp_path):
    with pytest.raises(SystemExit, match="patch check failed before profiling"):
        efficiency.main(["--configs", "spleen", "--models", "unet", "segresmamba", "--patch", "32", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was profiled or written


def test_profiler_times_a_loader_too(tmp_path):
    from segresmamba.data import write_phantoms

    write_phantoms.write_brats_phantom(tmp_path / "phantom", cases=5, size=32, seed=0)
    written = efficiency.main([
        "--configs", "brats", "--models", "unet", "--patch", "32", "--out", str(tmp_path / "eff"), "--skip-macs",
        "--data-config", "configs/data/brats_phantom.yaml", "--data-root", str(tmp_path / "phantom"),
    ])
    df = pd.read_csv(next(p for p in written if p.suffix == ".csv"))
    assert df.cpu_step_loaded_s.iloc[0] > 0 and "loader: segresmamba.data.BraTS2021DataModule" in df.data.iloc[0]
    with pytest.raises(SystemExit, match="data check failed before profiling"):
        efficiency.main(["--configs", "brats", "--models", "unet", "--patch", "32", "--out", str(tmp_path / "eff"),
                         "--data-config", "configs/data/brats_phantom.yaml", "--data-root", str(tmp_path / "nowhere")])


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


def _write_sweep(tmp_path: Path, models: list[str], recipes: list[str], folds: list[int], **fit) -> Path:
    """A sweep file in the CLI's own schema: the sweep's keys plus `segresmamba fit` settings."""
    spec = {
        "name": f"test-{tmp_path.name}",
        "dataset": "brats",
        "protocol": "test: 3 epochs x 8 steps, 32^3",
        "config": ["configs/trainer/cpu.yaml", "configs/data/brats_phantom.yaml"],
        "phantom": {"kind": "brats", "out": str(tmp_path / "phantom"), "cases": 5, "size": 32, "seed": 0},
        "models": models,
        "folds": folds,
        "recipes": recipes,
        "out": str(tmp_path / "results"),
        "runs_dir": str(tmp_path / "runs"),
        # segresmamba fit settings, as the CLI reads them
        "seed_everything": 0,
        "trainer": {"max_epochs": 3, "limit_train_batches": 8, "limit_val_batches": 1, "limit_test_batches": 1,
                    "enable_progress_bar": False, "num_sanity_val_steps": -1},
        "model": {"lr": 1.0e-2},
        "data": {"init_args": {"patch_size": 32, "batch_size": 2, "cache_rate": 1.0}},
        **fit,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_trains_one_row_per_recipe_model_fold_and_resumes(tmp_path, capsys):
    path = _write_sweep(tmp_path, ["unet"], ["paper", "nnunet"], [0])
    records = sweep.run_sweep(path)
    assert sorted((r["recipe"], r["model"], r["fold"], r["status"]) for r in records) == [
        ("nnunet", "unet", 0, "ok"), ("paper", "unet", 0, "ok")]
    out = tmp_path / "results"
    for recipe in ("paper", "nnunet"):
        rec = json.loads((out / recipe / "unet" / "fold0" / "metrics.json").read_text())
        assert rec["recipe"] == recipe and rec["recipe_settings"]["name"] == recipe  # what the run itself trained with
        assert rec["reported_checkpoint"] == "last" and rec["fit"]["global_steps"] >= 3  # trained, one epoch or more
        untrained = rec["fit"]["untrained"]["val/dice_mean"]
        if recipe == "paper":  # training did something: the trained network beats itself before its first step
            assert rec["test"]["test/dice_mean"] > 1.5 * untrained, (rec["test"]["test/dice_mean"], untrained)
        assert 0.0 <= untrained <= 1.0
        assert Path(rec["run_dir"]).is_relative_to(tmp_path / "runs")  # logs and checkpoints where runs_dir says
        assert int(rec["cpu_threads"]) >= 1
        run_cfg = yaml.safe_load(Path(rec["run_config"]).read_text())
        assert run_cfg["data"]["init_args"]["fold"] == 0 and run_cfg["model"] == {"lr": 1.0e-2}
        assert rec["data"]["provenance"] == "synthetic" and rec["paper_calculator_co2_kg"] > 0
    capsys.readouterr()

    # resume: nothing left to do
    assert sweep.run_sweep(path) == []
    assert capsys.readouterr().out.count("skip ") == 2

    # the summary has one row per recipe and model, with the recipe and the reported checkpoint
    summary = aggregate.aggregate(out)
    assert sorted(zip(summary.recipe, summary.model, summary.reported_checkpoint)) == [
        ("nnunet", "unet", "last"), ("paper", "unet", "last")]
    assert "| paper | unet | last | 1 |" in (out / "summary.md").read_text()
    assert "recipe nnunet" in (out / "paper_vs_ours.md").read_text()


def test_sweep_checks_before_the_first_run(tmp_path):
    # a patch a model cannot take
    path = _write_sweep(tmp_path, ["unet", "segresmamba"], ["paper"], [0])
    with pytest.raises(ValueError, match=r"patch check failed before training:\n  segresmamba needs a patch"):
        sweep.run_sweep(path)
    # missing data
    path = _write_sweep(tmp_path, ["unet"], ["paper"], [0], phantom=None, data={"init_args": {"patch_size": 32, "root": str(tmp_path / "nowhere")}})
    with pytest.raises(SystemExit, match="data check failed before training.*nowhere"):
        sweep.main([str(path)])
    # a setting the CLI does not know, in the CLI's own words
    path = _write_sweep(tmp_path, ["unet"], ["paper"], [0], trainer={"max_epochz": 1})
    with pytest.raises(ValueError, match=r"sweep file .*sweep.yaml: unet \[paper\] fold 0: trainer.max_epochz: no such setting of fit"):
        sweep.run_sweep(path)
    assert not (tmp_path / "results").exists()


def test_sweep_failed_run_becomes_an_error_row(tmp_path):
    path = _write_sweep(tmp_path, ["unet"], ["paper"], [0], model={"net_kwargs": {"no_such_setting": 1}})
    (record,) = sweep.run_sweep(path)
    assert record["status"] == "error" and "no_such_setting" in record["error"]
    record_file = tmp_path / "results" / "paper" / "unet" / "fold0" / "metrics.json"
    assert json.loads(record_file.read_text())["status"] == "error"
    # resume rules: a failed run is skipped, unless failed runs are retried; a lost record is run again
    assert sweep.run_sweep(path) == []
    assert [r["status"] for r in sweep.run_sweep(path, retry_failed=True)] == ["error"]
    record_file.unlink()
    assert [r["fold"] for r in sweep.run_sweep(path)] == [0]
    summary = aggregate.aggregate(tmp_path / "results")
    assert summary.set_index("model").loc["unet", "failed"] == 1 and summary.folds.iloc[0] == 0
    assert "unet [paper] fold 0" in (tmp_path / "results" / "summary.md").read_text()


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
    # records from before recipes (<model>/fold<k>, no recipe keys) read as what they ran: paper, best checkpoint
    for model, base, mem in (("segresmamba", 0.8, 3.6), ("swinunetr", 0.7, 11.4)):
        for fold in (0, 1):
            d = tmp_path / model / f"fold{fold}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_fake_record(model, fold, base + 0.02 * fold, mem)))
    aggregate.main([str(tmp_path)])
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("model")
    assert summary.loc["segresmamba", "test_dice_mean_mean"] == pytest.approx(0.81)
    assert summary.loc["swinunetr", "folds"] == 2
    assert (summary.recipe == "paper").all() and (summary.reported_checkpoint == "best").all()
    md = (tmp_path / "summary.md").read_text()
    assert "| paper | segresmamba | best | 2 | 0.810 ± 0.014" in md and "synthetic" in md and "NVIDIA H200" in md
    side = (tmp_path / "paper_vs_ours.md").read_text()
    assert "| segresmamba | 0.8839 | 0.810 ± 0.014 |" in side
    for name in ("fig2_dice_vs_memory.png", "fig3_dice_vs_co2.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_aggregation_keeps_recipes_apart(tmp_path):
    for recipe, dice in (("paper", 0.6), ("nnunet", 0.9)):
        for fold in (0, 1):
            d = tmp_path / recipe / "unet" / f"fold{fold}"
            d.mkdir(parents=True)
            record = {**_fake_record("unet", fold, dice, 1.0), "recipe": recipe, "reported_checkpoint": "last"}
            (d / "metrics.json").write_text(json.dumps(record))
    summary = aggregate.aggregate(tmp_path).set_index("recipe")
    assert summary.loc["nnunet", "test_dice_mean_mean"] == pytest.approx(0.9) and summary.loc["paper", "folds"] == 2
    assert set(summary.reported_checkpoint) == {"last"}
    side = (tmp_path / "paper_vs_ours.md").read_text()
    assert "| unet | 0.8444 | 0.900 ± 0.000 | 0.600 ± 0.000 |" in side  # one column per recipe, sorted by name
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no <recipe>/<model>/fold<k>/metrics.json"):
        aggregate.aggregate(tmp_path / "empty")


@pytest.mark.slow  # submitit's local executor spawns a process per run; the in-process sweep runs by default
def test_sweep_through_submitit_local_executor(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = _write_sweep(tmp_path, ["unet"], ["paper"], [0], trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1,
                                                                    "limit_test_batches": 1, "enable_progress_bar": False})
    args = [str(path), "--launcher", "submitit", "--gpus-per-job", "0", "--cpus-per-job", "1", "--mem-gb", "4",
            "--timeout-min", "20", "--submitit-folder", str(tmp_path / "jobs")]
    assert sweep.main(args) == 0
    assert "submitit: local executor" in capsys.readouterr().out
    record = json.loads((tmp_path / "results" / "paper" / "unet" / "fold0" / "metrics.json").read_text())
    assert record["status"] == "ok" and record["recipe"] == "paper" and record["fit"]["global_steps"] == 1
    assert list((tmp_path / "jobs").glob("*_log.out"))  # submitit's job logs
    sweep.main(args)  # the same resume logic: nothing resubmitted
    assert "skip unet [paper] fold 0: finished (ok)" in capsys.readouterr().out


def test_profiler_spreads_models_over_worker_processes(tmp_path):
    """The multi-GPU path: one process per (model, dataset), one at a time per device id (here on the CPU)."""
    argv = ["--cpu", "--patch", "32", "--skip-macs", "--skip-cpu-times"]
    written = efficiency.profile(["unet", "segresnet"], ["spleen"], out=tmp_path, gpus=["0", "1"], worker_argv=argv,
                                 cpu=True, patch=32, macs=False, cpu_step=False)
    rows = pd.read_csv(next(p for p in written if p.suffix == ".csv"))
    assert sorted(rows.model) == ["segresnet", "unet"] and (rows.params_m > 0).all()
    assert "error" not in rows or rows.error.isna().all()
    assert (rows.train_peak_gib_fp32 == "not measured").all()


def _efficiency_table(path: Path, rows: list[dict]) -> Path:
    """An efficiency table as the profiler writes it (the columns model_step reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"device": "NVIDIA H200", "git_sha": "abc1234", "train_peak_gib_fp32": 2.0, "train_peak_gib_bf16": 1.5}
    pd.DataFrame([{**base, **r} for r in rows]).to_csv(path, index=False)
    return path


def test_model_step_table_holds_eager_and_graphed_rows(tmp_path):
    from perf import model_step

    eager = _efficiency_table(tmp_path / "eager" / "brats.csv", [
        {"model": "segresmamba", "step_ms_fp32": 300.0, "step_ms_bf16": 200.0, "scan_backend": "triton", "infer_volume_s_bf16": 0.5,
         "train_reserved_gib_bf16": 2.5, "step_ms_pipelined_bf16": 170.0},
        {"model": "swinunetr", "step_ms_fp32": 150.0, "step_ms_bf16": 100.0, "scan_backend": None},
        {"model": "unet", "step_ms_fp32": 10.0, "step_ms_bf16": 8.0, "scan_backend": None},
    ])
    graphed = _efficiency_table(tmp_path / "graphs" / "brats.csv", [
        {"model": "segresmamba", "step_ms_fp32": 250.0, "step_ms_bf16": 120.0, "scan_backend": "triton", "cuda_graph_layers": 7,
         "graphs": "tom", "channels_last": False, "triton_scan_settings": '{"chunk": 32, "warps": 1}'},
    ])
    whole = _efficiency_table(tmp_path / "step_cl" / "brats.csv", [
        {"model": "segresmamba", "step_ms_bf16": 60.0, "scan_backend": "triton", "graphs": "step", "channels_last": True,
         "train_peak_gib_bf16": None, "train_reserved_gib_bf16": 9.0, "train_capture_peak_gib_bf16": 3.1,
         "train_graph_pool_gib_bf16": 2.4, "scan_auto_failures": "triton_fused: RuntimeError: dtype"},
    ])
    out = tmp_path / "out"
    model_step.main(["--table", str(eager), str(graphed), str(whole), "--out", str(out), "--models", "segresmamba", "swinunetr"])
    df = pd.read_csv(out / "model_step.csv")
    assert len(df) == 8 and set(df.precision) == {"bf16", "fp32"} and "unet" not in set(df.model)
    mine = df[(df.model == "segresmamba") & (df.precision == "bf16")].set_index("cuda_graphs")
    assert mine.loc["-", "step_ms"] == 200.0 and mine.loc["7 ToM layers", "step_ms"] == 120.0
    assert mine.loc["whole step", "step_ms"] == 60.0 and mine.loc["whole step", "layout"] == "NDHWC"
    assert mine.loc["-", "layout"] == "NCDHW" and (df.norms == "torch").all()
    assert mine.loc["-", "volume_s"] == 0.5 and pd.isna(mine.loc["7 ToM layers", "volume_s"])  # not measured: empty
    assert mine.loc["-", "reserved_gib"] == 2.5 and pd.isna(mine.loc["7 ToM layers", "reserved_gib"])
    assert pd.isna(mine.loc["whole step", "reserved_gib"])  # no valid peak in that run: its reserved is not shown either
    assert mine.loc["whole step", "capture_peak_gib"] == 3.1 and mine.loc["whole step", "pool_gib"] == 2.4
    assert pd.isna(mine.loc["-", "capture_peak_gib"]) and pd.isna(mine.loc["-", "pool_gib"])  # eager rows have neither
    assert mine.loc["-", "pipelined_ms"] == 170.0 and pd.isna(mine.loc["7 ToM layers", "pipelined_ms"])  # older runs: empty
    assert "whole 240x240x155 volume" in (out / "model_step.md").read_text()
    assert (df[df.model == "swinunetr"].cuda_graphs == "-").all() and (df[df.model == "swinunetr"].scan_backend == "-").all()
    assert set(df.config) == {"brats 128x128x128 b1"}  # the patch comes from the dataset spec
    assert "7 ToM layers" in (out / "model_step.md").read_text()
    # a row measured after a scan backend failed is named under the table, with the error
    assert ("**Scan backends failed while measured** (left out, so these rows ran on slower paths): segresmamba "
            "(whole step, NDHWC, torch, git abc1234): triton_fused: RuntimeError: dtype.") in (out / "model_step.md").read_text()
    # the Triton scan's launch settings: per row in the CSV (none for rows of older runs), listed under the table
    assert mine.loc["7 ToM layers", "triton_scan_settings"] == '{"chunk": 32, "warps": 1}'
    assert mine.loc["-", "triton_scan_settings"] == "-"
    assert '`{"chunk": 32, "warps": 1}`' in (out / "model_step.md").read_text()
    # tables of two configs are refused, and so is a config no spec knows
    spleen = _efficiency_table(tmp_path / "spleen.csv", [{"model": "unet", "step_ms_fp32": 1.0, "step_ms_bf16": 1.0}])
    with pytest.raises(SystemExit, match="different configs"):
        model_step.main(["--table", str(eager), str(spleen), "--out", str(out)])
    kits = _efficiency_table(tmp_path / "kits.csv", [{"model": "unet", "step_ms_fp32": 1.0, "step_ms_bf16": 1.0}])
    with pytest.raises(SystemExit, match="unknown dataset 'kits'"):
        model_step.main(["--table", str(kits), "--out", str(out)])


def test_model_step_measure_passes_each_modes_settings(tmp_path, monkeypatch):
    """``--measure`` profiles each chosen mode with its settings (recorded here instead of run on a GPU)."""
    import segresmamba.bench.efficiency as efficiency
    from perf import model_step

    calls = {}

    def fake_profile(models, configs, out, **options):
        assert options.pop("with_charts") is False  # the mode tables are sources of model_step.md, not charted
        calls[out.name] = (list(models), {k: v for k, v in options.items() if k not in ("macs", "cpu_step")})
        return [out / "brats.csv"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(efficiency, "profile", fake_profile)
    tables = model_step.measure(("unet",), tmp_path, ("eager", "step_fn", "step_cl_fn", "eager_gn"))
    assert [t.parent.name for t in tables] == ["eager", "step_fn", "step_cl_fn"]  # unet holds no GroupNorm: no eager_gn
    assert calls["eager"] == (["unet"], {})
    bf16 = {"precisions": ["bf16"], "inference": False}
    assert calls["step_fn"] == (["unet"], {"graphs": "step", "fast_norms": True, **bf16})
    assert calls["step_cl_fn"] == (["unet"], {"graphs": "step", "channels_last": True, "fast_norms": True, **bf16})


@pytest.mark.slow  # two gloo processes and one, about 40 s on 2 cores; the CLI's DDP test runs by default
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
    repo = Path(__file__).resolve().parents[1]
    gpu_sweep = sweep.Sweep.load(repo / "configs/bench/brats_synthetic_gpu.yaml")
    cpu_sweep = sweep.Sweep.load(repo / "configs/bench/brats_quick.yaml")
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


def test_step_profile_refuses_an_empty_kernel_list():
    from perf import step_profile

    with pytest.raises(SystemExit, match="--top must be at least 1, got 0"):
        step_profile.main(["--model", "segresmamba", "--top", "0"])


def test_step_profile_counts_every_norm_kernel_as_normalisation():
    """The whole-tensor norms' Triton kernels have generic names; each one of them is classed as normalisation."""
    import re

    from perf.step_profile import KINDS

    source = (Path(efficiency.__file__).parents[1] / "models" / "group_norm_kernels.py").read_text()
    names = re.findall(r"^def (_\w+_kernel)\(", source, re.M)
    assert len(names) >= 10
    for name in names:
        assert next(k for k, pattern in KINDS if re.search(pattern, name)) == "normalisation", name


@pytest.mark.parametrize("mode", ["tom", "step"])
def test_efficiency_refuses_cuda_graphs_on_a_cpu(mode, capsys):
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--cpu", "--graphs", mode, "--models", "unet"])
    assert f"--graphs {mode} needs a GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a GPU"):
        efficiency.profile_model("unet", "brats", cpu=True, graphs=mode)
    with pytest.raises(ValueError, match="graphs must be one of"):
        efficiency.profile_model("unet", "brats", cpu=True, graphs="all")


def test_step_profile_sums_kernel_time_by_kind():
    from perf.step_profile import kinds_of

    table = [("_bwd_grad_kernel", 8.0, 1), ("_carry_kernel", 1.0, 1), ("_conv_bwd_pre_kernel", 2.0, 1),
             ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>", 3.0, 6),
             ("sm80_xmma_fprop_implicit_gemm_indexed_bf16", 1.0, 3), ("void at::native::elementwise_kernel<128, 4>", 0.5, 60),
             ("something new", 0.25, 2), ("_stats_cl_kernel", 0.5, 4), ("_grad_input_kernel", 0.5, 4)]
    kinds = {k: (ms, n) for k, ms, n in kinds_of(table)}
    assert kinds["selective scan (Triton)"] == (9.0, 2) and kinds["oriented causal conv (Triton)"] == (2.0, 1)
    # the whole-tensor norms' Triton kernels count as normalisation, not "other"
    assert kinds["normalisation"] == (4.0, 14) and kinds["3D convolution (cuDNN)"] == (1.0, 3)
    assert kinds["elementwise and copies"] == (0.5, 60) and kinds["other"] == (0.25, 2)
    assert [k for k, _, _ in kinds_of(table)][0] == "selective scan (Triton)"  # largest first


def test_graph_pool_bytes_counts_the_free_part_of_private_pools(monkeypatch):
    """A replayed graph allocates nothing the allocator counts: the profiler adds the part of the graphs' private
    pools (pool id other than (0, 0)) that no live tensor holds, on the current device only."""
    segments = [
        {"total_size": 100, "allocated_size": 40, "segment_pool_id": (0, 0), "device": 0},  # the default pool
        {"total_size": 1000, "allocated_size": 300, "segment_pool_id": (1, 7), "device": 0},
        {"total_size": 500, "allocated_size": 500, "segment_pool_id": (1, 7), "device": 0},
        {"total_size": 800, "allocated_size": 0, "segment_pool_id": (2, 1), "device": 1},  # another device
    ]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert efficiency.graph_pool_bytes() == 700
    assert efficiency.graph_pool_bytes(free_only=False) == 1500


def test_pipelined_step_time_synchronises_only_before_and_after(monkeypatch):
    """Back-to-back steps: one synchronisation before the first and one after the last, and the mean per step."""
    syncs, calls = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(len(calls)))
    clock = iter(range(0, 100, 8))  # 8 s from the first reading to the second
    monkeypatch.setattr(efficiency.time, "perf_counter", lambda: next(clock))
    ms = efficiency.time_pipelined(lambda batch: calls.append(batch), {"image": 0}, steps=4)
    assert len(calls) == 4 and syncs == [0, 4]  # before any step, after the last
    assert ms == 8 * 1000 / 4


def test_step_time_figures_hold_the_median_and_the_spread():
    """A host-bound step's times scatter: the row keeps the median and the slowest minus the fastest beside it."""
    figures = efficiency.step_time_figures([70.0, 63.0, 90.0, 66.0, 64.0], "bf16")
    assert figures == {"step_ms_bf16": 66.0, "step_ms_spread_bf16": 27.0}
    assert efficiency.step_time_figures([5.0], "fp32")["step_ms_spread_fp32"] == 0.0


def test_model_step_table_carries_the_spread(tmp_path):
    from perf import model_step

    table = _efficiency_table(tmp_path / "eager" / "brats.csv", [
        {"model": "segresmamba", "step_ms_bf16": 66.0, "step_ms_spread_bf16": 27.0, "step_ms_fp32": 80.0},
    ])
    model_step.main(["--table", str(table), "--out", str(tmp_path / "out"), "--models", "segresmamba"])
    df = pd.read_csv(tmp_path / "out" / "model_step.csv").set_index("precision")
    assert df.loc["bf16", "spread_ms"] == 27.0 and pd.isna(df.loc["fp32", "spread_ms"])  # not recorded: empty
    assert df.host_gemm_us.isna().all()  # a run before the host's costs were recorded


def test_model_step_table_carries_the_hosts_costs(tmp_path):
    from perf import model_step

    table = _efficiency_table(tmp_path / "eager" / "brats.csv", [
        {"model": "segresmamba", "step_ms_bf16": 66.0, "host_elementwise_us": 7.5, "host_gemm_us": 13.0},
    ])
    model_step.main(["--table", str(table), "--out", str(tmp_path / "out"), "--models", "segresmamba"])
    df = pd.read_csv(tmp_path / "out" / "model_step.csv")
    assert (df.host_op_us == 7.5).all() and (df.host_gemm_us == 13.0).all()  # the row's process, both precisions
    assert "host_gemm_us" in (tmp_path / "out" / "model_step.md").read_text()


def test_host_time_splits_the_step_by_phase_module_and_operator():
    """On the CPU every kernel runs on the host, so the phases add up to the step and the forward's module
    classes (exclusive of children) add up to the forward; the wrappers leave the task and optimiser as they were."""
    from perf.host_time import forward_host_by_module, host_ops, phase_host_ms
    from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
    from segresmamba.data.spec import get_dataset_spec

    spec = get_dataset_spec("spleen")
    step = TrainingStep(build_task("unet", spec, patch=32), "fp32", torch.device("cpu"))
    batch = synthetic_batch(spec, (32, 32, 32), torch.device("cpu"))
    phases = phase_host_ms(step, batch, steps=2)
    assert set(phases) == {"forward", "backward", "optimizer", "step"} and all(v > 0 for v in phases.values())
    assert phases["forward"] + phases["optimizer"] <= phases["step"]
    assert "training_step" not in vars(step.task) and "step" not in vars(step.optimizer)  # wrappers removed
    by_module = forward_host_by_module(step, batch, steps=2)
    names = {name: (ms, n) for name, ms, n in by_module}
    assert "Conv3d" in names and names["Conv3d"][1] > 0 and names["Conv3d"][0] > 0
    assert "(outside modules)" in names  # the loss
    assert not step.task.net._forward_hooks and not step.task.net._forward_pre_hooks
    assert all(not m._forward_hooks for m in step.task.net.modules())
    ops, total = host_ops(step, batch, steps=1)
    op_names = [name for name, _, _ in ops]
    assert "aten::convolution" in op_names and "aten::convolution_backward" in op_names
    assert total == pytest.approx(sum(ms for _, ms, _ in ops)) and all(n >= 1 for _, _, n in ops)


def test_host_python_splits_the_steps_python_by_function_and_origin():
    """cProfile over whole steps: the suite's training step and torch's optimiser are among the functions, each with
    its calls per step; the origins' self times add up to the functions'; no profiler is left running."""
    import sys

    from perf.host_time import host_python, python_origin
    from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
    from segresmamba.data.spec import get_dataset_spec

    assert python_origin("/x/site-packages/segresmamba/task.py") == "segresmamba"
    assert python_origin("/x/site-packages/triton/runtime/jit.py") == "triton"
    assert python_origin("~") == "builtins" and python_origin("/usr/lib/python3.11/functools.py") == "other"
    spec = get_dataset_spec("spleen")
    step = TrainingStep(build_task("unet", spec, patch=32), "fp32", torch.device("cpu"))
    batch = synthetic_batch(spec, (32, 32, 32), torch.device("cpu"))
    functions, origins = host_python(step, batch, steps=2)
    by_name = {name: (origin, own, cumulative, calls) for name, origin, own, cumulative, calls in functions}
    training_step = [v for name, v in by_name.items() if name.startswith("task.py:") and name.endswith("(training_step)")]
    assert len(training_step) == 1 and training_step[0][0] == "segresmamba" and training_step[0][3] == 1
    assert training_step[0][2] >= training_step[0][1] > 0  # cumulative holds its own lines
    assert any(origin == "torch" for origin, *_ in by_name.values())
    assert sum(origins.values()) == pytest.approx(sum(own for _, _, own, _, _ in functions))
    assert list(origins.values()) == sorted(origins.values(), reverse=True)
    assert sys.getprofile() is None
    # the step profile's eager host sections carry the table, one row per function, largest self time first
    from perf.step_profile import HOST_TOP, host_sections

    lines = host_sections(step, batch)
    start = lines.index("## eager: the host's Python time by function (cProfile self time, forward, backward and optimiser)")
    rows = [line for line in lines[start:] if line.startswith("| `")]
    assert len(rows) == min(HOST_TOP, len(functions)) and "segresmamba" in lines[start + 2]


def test_tom_host_counts_the_fused_layers_launches_and_operators_without_running_its_kernels(tmp_path):
    """perf.tom_host runs the fused ToM path on the CPU with every Triton launch a counter: one forward launches the
    norm, the conv, the three scan passes and the gate, the backward seven more; the kernels and TRITON_INTERPRET are put
    back after."""
    pytest.importorskip("triton")
    import os

    from perf import tom_host
    from segresmamba.ssm.triton import autograd, fused_tom

    kernels = {name: getattr(autograd, name) for name in ("_fwd_output_kernel", "_bwd_grad_kernel", "_carry_kernel")}
    before = os.environ.get("TRITON_INTERPRET")
    m = tom_host.measure(dim=8, side=4, steps=2, repeats=1)
    assert m["forward_launches"] == 6
    # the conv forward runs again in the backward (u is recomputed, not kept)
    assert m["launches"] == {"_token_norm_fwd_kernel": 1, "_conv_fwd_kernel": 2, "_fwd_chunk_state_kernel": 1, "_carry_kernel": 2,
                             "_fwd_output_kernel": 1, "_gate_fwd_kernel": 1, "_gate_bwd_kernel": 1,
                             "_bwd_chunk_state_kernel": 1, "_bwd_grad_kernel": 1,
                             "_conv_bwd_pre_kernel": 1, "_conv_bwd_dx_kernel": 1, "_token_norm_bwd_kernel": 1}
    assert "native_layer_norm" not in m["forward_by_name"]  # the norm is one of the counted launches
    assert m["forward_us"] > 0 and m["backward_us"] > 0
    # the projections run as matmuls in the forward and twice as many in the backward; views are counted apart
    assert m["forward_by_name"]["bmm"] + m["forward_by_name"]["mm"] >= 2 and "view" not in m["forward_by_name"]
    assert m["backward_ops"] > m["forward_ops"] > 0 and m["forward_views"] > 0
    assert all(getattr(autograd, name) is kernel for name, kernel in kernels.items())
    assert fused_tom._conv_fwd_kernel.__class__.__name__ != "LaunchCounter"
    assert os.environ.get("TRITON_INTERPRET") == before
    assert tom_host.main(["--steps", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "tom_host.md").read_text()
    assert "| step |" in text and "git " in text and "`_bwd_grad_kernel` 1" in text


def test_gpu_idle_goes_to_what_the_host_ran_when_it_launched_the_next_kernel():
    """A synthetic trace: one step; the wait before the first kernel, a gap after a backward node's launch, one
    under the threshold, the optimiser's and one outside every labelled range; nested modules give the innermost."""
    from perf.host_time import STEP_LABEL, idle_by_context

    def cpu(name, ts, dur, tid=1):
        return {"ph": "X", "cat": "user_annotation" if "::" in name else "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(ts, corr, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid, "args": {"correlation": corr}}

    def kernel(ts, end, corr):
        return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": end - ts, "tid": 7, "args": {"correlation": corr}}

    events = [
        cpu(STEP_LABEL, 0, 110), cpu("module::ResBlock", 0.5, 25), cpu("module::Conv3d", 1, 19),
        cpu("autograd::engine::evaluate_function: XBackward0", 40, 20, tid=2), cpu("phase::optimiser", 80, 19),
        launch(5, 1), kernel(10, 30, 1),
        launch(50, 2, tid=2), kernel(55, 70, 2),
        launch(52, 3, tid=2), kernel(70.5, 80, 3),
        launch(85, 4), kernel(90, 95, 4),
        launch(99.5, 5), kernel(101, 102, 5),
        launch(150, 6), kernel(151, 152, 6),  # launched after the step: not its work
        {"ph": "X", "cat": "kernel", "name": "orphan", "ts": 60, "dur": 1, "args": {}},  # no launch on record
    ]
    totals, rows = idle_by_context(events, min_gap_us=2.0)
    got = {context: (round(ms * 1e3, 6), n) for context, ms, n in rows}
    assert got == {"forward: Conv3d": (10, 1), "backward: XBackward0": (25, 1), "optimiser": (10, 1), "(other)": (6, 1)}
    assert totals["steps"] == 1
    assert totals["idle"] * 1e3 == pytest.approx(51) and totals["busy"] * 1e3 == pytest.approx(20 + 15 + 9.5 + 5 + 1)
    assert [r[0] for r in rows] == ["backward: XBackward0", "forward: Conv3d", "optimiser", "(other)"]


def test_gpu_idle_labels_a_real_step_and_leaves_it_as_it_was():
    """On the CPU the step has no GPU work (no waits), but its trace carries the labels the GPU profile
    attributes waits to: the forward's modules, the backward's autograd nodes and the optimiser; afterwards the
    task, its net and the optimiser have no hooks or wrappers left."""
    from torch.profiler import ProfilerActivity, profile

    from perf.host_time import _context, _labelled, _module_ranges, gpu_idle
    from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
    from segresmamba.data.spec import get_dataset_spec

    spec = get_dataset_spec("spleen")
    step = TrainingStep(build_task("unet", spec, patch=32), "fp32", torch.device("cpu"))
    batch = synthetic_batch(spec, (32, 32, 32), torch.device("cpu"))
    totals, rows = gpu_idle(step, batch, steps=1)
    assert totals == {"steps": 1, "idle": 0.0, "busy": 0.0} and rows == []
    assert "training_step" not in vars(step.task) and "step" not in vars(step.optimizer)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in step.task.net.modules())
    with _module_ranges(step.task.net), _labelled(step.optimizer, "step", "phase::optimiser"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch)
    contexts = {_context(e.name) for e in prof.events()} - {None}
    assert {"forward: Conv3d", "optimiser"} <= contexts
    assert any(c.startswith("backward: ConvolutionBackward") for c in contexts)


def test_host_costs_measure_what_the_device_has():
    """On a CPU the elementwise op and the GEMM are timed; cuDNN and Triton launches are GPU-only (None)."""
    from segresmamba.profiling.host import host_costs, host_costs_text

    costs = host_costs(torch.device("cpu"), calls=3)
    assert costs["elementwise"] > 0 and costs["gemm"] > 0
    assert costs["conv3d"] is None and costs["triton_launch"] is None
    text = host_costs_text(costs)
    assert text.startswith("elementwise op ") and ", GEMM " in text and "Triton" not in text


@pytest.mark.gpu
def test_gpu_rows_record_the_hosts_costs():
    """A GPU row carries what an elementwise op, a GEMM, a cuDNN conv3d and a Triton launch cost its process's host,
    measured after the task is built."""
    row = efficiency.profile_model("unet", "spleen", patch=32, precisions=("bf16",), macs=False, inference=False)
    assert "error" not in row and row["step_ms_bf16"] > 0
    assert all(row[f"host_{kind}_us"] > 0 for kind in ("elementwise", "gemm", "conv3d"))


@pytest.mark.gpu
def test_gpu_idle_on_a_gpu_step_accounts_for_its_kernels():
    """On a GPU, the trace's kernels are found and matched to their launches: the steps have busy time, and their
    waits, summed by context, go to the forward's modules and the backward's nodes among others."""
    from perf.host_time import gpu_idle
    from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
    from segresmamba.data.spec import get_dataset_spec

    spec = get_dataset_spec("spleen")
    device = torch.device("cuda")
    step = TrainingStep(build_task("unet", spec, patch=32), "bf16", device)
    batch = synthetic_batch(spec, (32, 32, 32), device)
    totals, rows = gpu_idle(step, batch, steps=2)
    assert totals["steps"] == 2 and totals["busy"] > 0 and rows
    assert totals["idle"] == pytest.approx(sum(ms for _, ms, _ in rows))
    contexts = [c for c, _, _ in rows]
    assert any(c.startswith("forward: ") for c in contexts) and any(c.startswith("backward: ") for c in contexts)


def test_targets_pair_rows_of_one_run_only(tmp_path):
    """perf.targets compares two rows only when one card and one commit measured both, and says so otherwise."""
    from perf import targets

    def row(model, sha, ms, graphs="-", norms="torch", peak=None, pipelined=None):
        return {"device": "NVIDIA H200", "model": model, "config": "brats 128x128x128 b1", "precision": "bf16", "peak_gib": peak,
                "step_ms": ms, "pipelined_ms": pipelined, "cuda_graphs": graphs, "layout": "NCDHW", "norms": norms, "git_sha": sha}

    steps = pd.DataFrame([
        row("nnunet", "b" * 40, 50.0), row("segresmamba", "a" * 40, 70.0, peak=2.9, pipelined=60.0),
        row("nnunet", "a" * 40, 60.0, pipelined=59.0), row("segresmamba", "c" * 40, 40.0),  # c: no nnunet row
        row("segresmamba", "a" * 40, 28.0, graphs="whole step", norms="whole-tensor", peak=4.2),
        row("segmamba", "a" * 40, 90.0, graphs="whole step"), row("segmamba", "a" * 40, 180.0),
    ])
    got = {r["target"]: r for r in targets.step_targets(steps)}
    eager = got["SegResMamba eager step <= nnU-Net-style eager step (one run)"]
    assert eager["met"] == "no" and eager["measured"].startswith("70.0 ms against 60.0 ms") and "aaaaaaa" in eager["source"]
    assert "back to back 60.0 against 59.0" in eager["measured"]
    # met only where the synchronised and the back-to-back step both meet it; the spreads are shown where recorded
    pair = pd.DataFrame([row("nnunet", "d" * 40, 52.6, pipelined=52.1), row("segresmamba", "d" * 40, 48.9, pipelined=48.2)])
    pair["spread_ms"] = [0.1, 8.1]
    mixed = pair.assign(pipelined_ms=[52.1, 53.0])
    assert [targets.step_targets(t)[0]["met"] for t in (pair, mixed)] == ["yes", "no"]
    assert "synchronised (slowest minus fastest step: 8.1 and 0.1)" in targets.step_targets(pair)[0]["measured"]
    # other processes of the same run count (those of another commit do not); met only where every process meets it
    def repeat(path, sha, mine, theirs):
        pd.DataFrame([{"model": m, "device": "NVIDIA H200", "git_sha": sha, "step_ms_bf16": sync, "step_ms_pipelined_bf16": piped}
                      for m, (sync, piped) in (("segresmamba", mine), ("nnunet", theirs))]).to_csv(path, index=False)
        return path

    slow = repeat(tmp_path / "r1.csv", "d" * 40, (63.9, 48.5), (53.0, 52.2))
    other = repeat(tmp_path / "r2.csv", "e" * 40, (99.0, 99.0), (50.0, 50.0))
    fine = repeat(tmp_path / "r3.csv", "d" * 40, (50.1, 47.6), (53.6, 53.1))
    counted = targets.step_targets(pair, targets.eager_repeats([slow, other, fine]))[0]
    assert counted["met"] == "in 2 of 3 processes synchronised, 3 of 3 back to back"
    assert "2 more processes, synchronised 63.9 / 53.0, back to back 48.5 / 52.2; 50.1 / 53.6" in counted["measured"]
    assert targets.step_targets(pair, targets.eager_repeats([fine]))[0]["met"] == "yes"
    lone = tmp_path / "lone.csv"
    pd.read_csv(fine).iloc[:1].to_csv(lone, index=False)
    with pytest.raises(SystemExit, match="lacks the segresmamba or the nnunet row"):
        targets.eager_repeats([lone])
    fastest = got["SegResMamba fastest mode <= 30 ms"]
    assert fastest["met"] == "yes" and "28.0 ms (CUDA graphs: whole step, norms whole-tensor)" in fastest["measured"]
    assert got["SegResMamba peak <= 3 GiB (eager)"]["met"] == "yes"
    assert got["SegResMamba peak <= 3 GiB (fastest mode)"]["met"] == "no"
    assert got["SegResMamba peak <= 3 GiB (fastest mode)"]["measured"].endswith("(CUDA graphs: whole step, norms whole-tensor)")
    # a graphed row that records its peak's parts shows them
    parts = steps.assign(capture_peak_gib=[None] * 4 + [2.7, None, None], pool_gib=[None] * 4 + [2.4, None, None],
                         reserved_gib=[None] * 4 + [4.3, None, None])
    assert ("4.20 GiB (CUDA graphs: whole step, norms whole-tensor); capture 2.70, graphs' pool 2.40, held 4.30 GiB"
            == {r["target"]: r for r in targets.step_targets(parts)}["SegResMamba peak <= 3 GiB (fastest mode)"]["measured"])
    assert got["SegMamba step <= 93.5 ms (half of 187)"]["met"] == "yes"
    # over the limit, the fastest graphed row of the same run within it is named (not an eager one, nor another run's)
    leaner = pd.concat([steps, pd.DataFrame([row("segresmamba", "a" * 40, 30.5, graphs="whole step", peak=2.95),
                                             row("segresmamba", "b" * 40, 29.0, graphs="whole step", peak=2.5)])], ignore_index=True)
    peak_row = {r["target"]: r for r in targets.step_targets(leaner)}["SegResMamba peak <= 3 GiB (fastest mode)"]
    assert peak_row["met"] == "no" and peak_row["measured"].endswith("; within 3 GiB in that run: 2.95 GiB at 30.5 ms (CUDA graphs: whole step)")

    def scan_row(backend, sha, ms, variant=None):
        return {"device": "NVIDIA H200", "kind": "tom", "case": "C48 64^3 b1", "backend": backend, "precision": "bf16",
                "variant": variant, "fwd_bwd_ms": ms, "git_sha": sha}

    scan = pd.DataFrame([scan_row("triton", "x", 10.0, "chunk=64, fused"), scan_row("mamba_ssm", "y", 40.0),
                         scan_row("triton_per_branch", "x", 12.0, "chunk=64")])
    assert targets.tom_target(scan)["met"] == "not measured"  # never in one run
    scan = pd.concat([scan, pd.DataFrame([scan_row("mamba_ssm", "x", 50.0)])], ignore_index=True)
    tom = targets.tom_target(scan)
    assert tom["met"] == "yes" and tom["measured"].startswith("10.00 ms against 50.00 ms: 0.20")
    steps.to_csv(tmp_path / "model_step.csv", index=False)
    scan.to_csv(tmp_path / "scan.csv", index=False)
    assert targets.main(["--model-step", str(tmp_path / "model_step.csv"), "--scan", str(tmp_path / "scan.csv"), "--out", str(tmp_path)]) == 0
    assert "| ToM C48 64^3 b1 fwd+bwd <= 0.25 x mamba_ssm (one run)" in (tmp_path / "targets.md").read_text()
    assert "no repeat table" in (tmp_path / "targets.md").read_text()  # none beside this model_step.csv
    with pytest.raises(SystemExit, match="eager repeat table"):
        targets.main(["--model-step", str(tmp_path / "model_step.csv"), "--scan", str(tmp_path / "scan.csv"),
                      "--repeats", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit, match="not found"):
        targets.main(["--model-step", str(tmp_path / "missing.csv")])
