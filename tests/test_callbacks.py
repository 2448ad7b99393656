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
