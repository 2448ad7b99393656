"""The measuring callbacks: run-record details that a CPU fit cannot show by itself, the step timer's two clocks,
and (GPU) a fit that does not wait for the GPU within an epoch."""

from types import SimpleNamespace

import pytest
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


class FakeEvent:
    """A CUDA event on a fake timeline: ``record`` stamps the clock; an event has passed once the GPU's clock
    (``gpu_now``) reaches its stamp. ``synchronize`` advances the GPU's clock and counts the waits."""

    clock = {"host": 0.0, "gpu_now": 0.0, "waits": 0}

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.stamp = None

    def record(self):
        self.stamp = self.clock["host"]

    def query(self):
        return self.clock["gpu_now"] >= self.stamp

    def synchronize(self):
        if not self.query():
            self.clock["waits"] += 1
            self.clock["gpu_now"] = self.stamp

    def elapsed_time(self, end):
        return (end.stamp - self.stamp) * 1000.0  # ms, as CUDA events give


def test_step_timer_on_a_gpu_times_by_events_without_waiting_each_step(monkeypatch):
    """Each step's time is its events' span, read once they have passed: no step waits for the GPU, the times
    come out in step order, and the warm-up steps are left out of the median."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setitem(FakeEvent.clock, "host", 0.0)
    monkeypatch.setitem(FakeEvent.clock, "gpu_now", 0.0)
    monkeypatch.setitem(FakeEvent.clock, "waits", 0)
    module = SimpleNamespace(device=torch.device("cuda", 0))
    timer = callbacks.StepTimer(warmup=1)
    timer.on_train_epoch_start(None, module)
    for i, seconds in enumerate([5.0, 1.0, 2.0, 3.0]):
        timer.on_train_batch_start(None, module, None, i)
        FakeEvent.clock["host"] += seconds
        timer.on_train_batch_end(None, module, None, None, i)
        FakeEvent.clock["gpu_now"] = FakeEvent.clock["host"] - 2.5  # the GPU runs behind the host
    assert FakeEvent.clock["waits"] == 0
    assert timer.step_s == [5.0]  # the one step whose end the GPU has passed; three are still in flight
    timer.on_train_epoch_end(None, module)  # reads the rest, waiting for them
    assert timer.step_s == [5.0, 1.0, 2.0, 3.0] and FakeEvent.clock["waits"] > 0
    assert timer.median_step_ms == 2000.0 and len(timer.epoch_s) == 1


def test_step_timer_on_a_cpu_uses_the_wall_clock():
    module = SimpleNamespace(device=torch.device("cpu"))
    timer = callbacks.StepTimer(warmup=0)
    timer.on_train_batch_start(None, module, None, 0)
    timer.on_train_batch_end(None, module, None, None, 0)
    assert len(timer.step_s) == 1 and 0 <= timer.step_s[0] < 1 and timer.median_step_ms >= 0


@pytest.mark.gpu
def test_cuda_fit_waits_for_the_gpu_only_at_epoch_ends(monkeypatch):
    """A CUDA fit with a progress bar and the step timer makes the host wait for the GPU (an explicit synchronise or
    a logged value read back) only at the end of an epoch, never within one; the timer still reports its steps."""
    import lightning as L
    from lightning.pytorch.trainer.connectors.logger_connector import result

    from segresmamba.data import SyntheticBraTSDataModule
    from segresmamba.task import SegmentationTask

    waits = []
    synchronize, convert = torch.cuda.synchronize, result.convert_tensors_to_scalars
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: waits.append(trainer.global_step) or synchronize(*a, **k))
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda v: waits.append(trainer.global_step) or convert(v))
    dm = SyntheticBraTSDataModule(volume_size=32, num_train=6, num_val=1, num_test=1, patch_size=16)
    module = SegmentationTask(net="unet", net_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0},
                              in_channels=4, out_channels=3, img_size=16, task="multilabel", class_names=["TC", "WT", "ET"])
    timer = callbacks.StepTimer(warmup=1)
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=True,
                        enable_model_summary=False, max_epochs=2, limit_val_batches=0, log_every_n_steps=50, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 12
    assert set(waits) <= {0, 6, 12}, waits  # before the first step and at the two epochs' ends
    assert len(timer.step_s) == 12 and all(t > 0 for t in timer.step_s) and timer.median_step_ms > 0
