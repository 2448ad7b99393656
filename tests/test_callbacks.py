"""Run-record details that a CPU fit cannot show by itself."""

from types import SimpleNamespace

import torch

from segresmamba import callbacks


def test_run_record_names_the_strategy_device_not_the_torn_down_module(monkeypatch):
    # Lightning calls on_fit_end after teardown has moved the module back to the CPU; the record must
    # still name the accelerator the fit ran on.
    seen = {}

    def fake_provenance(device, precision):
        seen["device"], seen["precision"] = device, precision
        return {"device": str(device)}

    monkeypatch.setattr(callbacks, "provenance", fake_provenance)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 1)), precision="bf16-mixed", datamodule=None)
    module = SimpleNamespace(hparams={"net": "unet"}, parameters=lambda: iter([torch.zeros(3)]), device=torch.device("cpu"))
    record = callbacks.RunRecorder()._common(trainer, module)
    assert seen == {"device": torch.device("cuda", 1), "precision": "bf16-mixed"}
    assert record["model"] == "unet" and record["params"] == 3
    assert record["scan_auto_choices"] == {}  # nothing measured on the CPU
    assert record["cuda_graph_layers"] is None  # no ToMCudaGraphs callback


def test_run_record_names_the_scan_backends_auto_chose(monkeypatch):
    from segresmamba.ssm import scan

    monkeypatch.setattr(callbacks, "provenance", lambda device, precision: {})
    scan.record_auto_choice("ToM dim 48 x (1, 48, 64, 64, 64)", "triton_fused", {"triton_fused": 30.0, "per_branch": 40.0})
    try:
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision="32", datamodule=None)
        module = SimpleNamespace(hparams={"net": "segresmamba"}, parameters=lambda: iter([]))
        record = callbacks.RunRecorder()._common(trainer, module)
    finally:
        scan.auto_choices(reset=True)
    assert record["scan_auto_choices"] == {"ToM dim 48 x (1, 48, 64, 64, 64)": {"backend": "triton_fused", "ms": {"triton_fused": 30.0, "per_branch": 40.0}}}


def test_peak_memory_restarts_after_the_first_step_once(monkeypatch):
    # the first step holds one-off work (cuDNN autotuning, the scan dispatch timing its backends)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    cb = callbacks.PeakMemory()
    module = SimpleNamespace(device=torch.device("cuda", 0))
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10)
    cb.on_train_start(trainer, module)
    assert len(resets) == 1
    for step in (1, 2, 3):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    assert len(resets) == 2  # once after step 1, never again
    single = callbacks.PeakMemory()
    single.on_train_start(SimpleNamespace(global_step=0, estimated_stepping_batches=1), module)
    single.on_train_batch_end(SimpleNamespace(global_step=1, estimated_stepping_batches=1), module, None, None, 0)
    assert len(resets) == 3  # a one-step fit keeps its only step
