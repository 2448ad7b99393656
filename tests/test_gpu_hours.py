"""The GPU-hours estimate of the paper protocol: arithmetic, paper columns and bad input."""

import pandas as pd
import pytest

from segresmamba.bench import gpu_hours


def _table(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _row(model, step_ms, volume_s, device="NVIDIA H200"):
    return {"model": model, "step_ms_bf16": step_ms, "infer_volume_s_bf16": volume_s, "step_ms_fp32": step_ms * 2,
            "infer_volume_s_fp32": volume_s * 2, "device": device, "git_sha": "abc1234"}


def test_brats_estimate_is_folds_x_epochs_x_cases_x_time(tmp_path):
    csv = _table(tmp_path / "brats.csv", [_row("segresmamba", 100.0, 0.5), _row("unet", 20.0, 0.1)])
    df = gpu_hours.estimate(csv, "bf16", folds=5, epochs=200).set_index("model")
    # 1,251 cases, 5 folds -> 250 validation and 1,001 training cases per fold
    assert df.loc["segresmamba", "train_cases"] == 1001 and df.loc["segresmamba", "val_cases"] == 250
    assert df.loc["segresmamba", "train_gpu_h"] == pytest.approx(5 * 200 * 1001 * 0.1 / 3600)
    assert df.loc["segresmamba", "val_gpu_h"] == pytest.approx(5 * 200 * 250 * 0.5 / 3600)
    assert df.loc["segresmamba", "epoch_s"] == pytest.approx(1001 * 0.1 + 250 * 0.5)
    assert df.loc["segresmamba", "energy_kwh_at_tdp"] == pytest.approx(df.loc["segresmamba", "total_gpu_h"] * 0.7)
    # the paper's Table 6 epoch time sits beside ours (267.83 s, A100)
    assert df.loc["segresmamba", "paper_5fold_h"] == pytest.approx(267.83 * 200 * 5 / 3600)
    assert df.loc["unet", "paper_epoch_s"] == pytest.approx(255.80)  # UNet is in Table 6 too
    fp32 = gpu_hours.estimate(csv, "fp32").set_index("model")
    assert fp32.loc["unet", "total_gpu_h"] == pytest.approx(2 * df.loc["unet", "total_gpu_h"])


def test_cli_writes_markdown_and_skips_unmeasured_rows(tmp_path):
    _table(tmp_path / "spleen.csv", [_row("segresmamba", 50.0, 0.2), _row("unetr", float("nan"), float("nan"), device="CPU")])
    assert gpu_hours.main([str(tmp_path)]) == 0
    text = (tmp_path / "gpu_hours.md").read_text()
    assert "MSD Spleen" in text and "| segresmamba |" in text and "unetr" not in text
    assert "nan" not in text
    assert len(pd.read_csv(tmp_path / "gpu_hours.csv")) == 1


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown config 'kits'"):
        gpu_hours.estimate(_table(tmp_path / "kits.csv", [_row("unet", 1.0, 1.0)]))
    with pytest.raises(ValueError, match="step_ms_bf16"):
        gpu_hours.estimate(_table(tmp_path / "brats.csv", [{"model": "unet", "device": "x", "git_sha": "y"}]))
    with pytest.raises(ValueError, match="precision"):
        gpu_hours.estimate(tmp_path / "brats.csv", "fp8")
    with pytest.raises(SystemExit, match="no brats/btcv/spleen.csv"):
        gpu_hours.main([str(tmp_path / "empty")])


def test_back_to_back_step_time_is_used_where_the_row_has_it(tmp_path):
    """A fit runs steps back to back: where the profiler recorded that mean, it is the step time; older rows keep the
    synchronised median, and the table says which each row used."""
    pipelined = {**_row("segresmamba", 100.0, 0.5), "step_ms_pipelined_bf16": 80.0}
    older = {**_row("unet", 20.0, 0.1), "step_ms_pipelined_bf16": float("nan")}
    csv = _table(tmp_path / "brats.csv", [pipelined, older])
    df = gpu_hours.estimate(csv, "bf16").set_index("model")
    assert df.loc["segresmamba", "train_gpu_h"] == pytest.approx(5 * 200 * 1001 * 0.08 / 3600)
    assert df.loc["segresmamba", "step_timing"] == "back to back"
    assert df.loc["unet", "train_gpu_h"] == pytest.approx(5 * 200 * 1001 * 0.02 / 3600)
    assert df.loc["unet", "step_timing"] == "synchronised"
    assert "| segresmamba | back to back |" in gpu_hours.to_markdown(df.reset_index())
