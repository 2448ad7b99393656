"""``segresmamba fit|validate|test|predict``: the Lightning CLI over every model and dataset.

Configs stack with ``-c``, one folder per concern: ``configs/trainer/``, ``configs/model/``, ``configs/data/``,
``configs/recipe/`` (the training recipe) and ``configs/callbacks/`` (optional callbacks, appended to the
default list with ``trainer.callbacks+``); any setting can be overridden on the command line
(``--model.net unetr``, ``--trainer.max_epochs 5``).
With no data config the embedded synthetic BraTS-like data is used. ``segresmamba doctor`` reports the
environment (torch, CUDA, GPU, scan backends).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Literal, Optional

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segresmamba.callbacks import PeakMemory, RunRecorder, StepTimer
from segresmamba.data.base import VolumeDataModule
from segresmamba.prediction import NiftiMaskWriter
from segresmamba.task import SegmentationTask

DEFAULT_DATA = "segresmamba.data.SyntheticBraTSDataModule"
# The callbacks of every run unless a config replaces the list (configs/callbacks/ appends to it)
DEFAULT_CALLBACKS = [
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/dice_mean", "mode": "max", "filename": "best-{epoch}-{step}", "save_last": True},
    },
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "epoch"}},
]
# Measured in every run (they are part of every result): added when a replaced list leaves them out
MEASUREMENTS = (PeakMemory, StepTimer)


class SegResMambaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the data decides channels, classes, activation and the patch (= sliding-window ROI)
        for source, target in (
            ("in_channels", "in_channels"),
            ("out_channels", "out_channels"),
            ("task", "task"),
            ("class_names", "class_names"),
            ("patch_size", "img_size"),
            ("recipe", "recipe"),
        ):
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        gpu = torch.cuda.is_available()
        parser.set_defaults(
            {
                "data": {"class_path": DEFAULT_DATA},
                "trainer.accelerator": "auto",
                "trainer.precision": "bf16-mixed" if gpu else "32-true",
                "trainer.default_root_dir": "runs",
                "trainer.callbacks": DEFAULT_CALLBACKS,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
            }
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="after fit, test the reported checkpoint in the same process (one start-up and data setup instead of two)",
        )
        parser.add_argument(
            "--report_checkpoint", type=Literal["last", "best"], default="last",
            help="checkpoint that --test_after_fit scores and metrics.json reports: last (the final weights, nnU-Net's "
                 "practice: nothing is chosen on the cases it is scored on) or best (best validation Dice; optimistic "
                 "when the test cases are the validation cases)",
        )
        parser.add_argument("--run_record", type=Optional[str], default=None, help="metrics.json path (default: the run directory)")
        parser.add_argument(
            "--output_dir", type=Optional[str], default=None,
            help="predict: folder for the masks, one <case_id>.nii.gz per case on the scan's own grid "
                 "(default: predictions/ in the run folder)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        precision = str(config.trainer.precision)
        accelerator = str(config.trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise SystemExit("error: trainer.accelerator asks for a GPU but CUDA is not available on this machine")
        graphed = [c for c in config.trainer.callbacks or [] if str(getattr(c, "class_path", "")).endswith("ToMCudaGraphs")]
        if graphed and not torch.cuda.is_available():
            raise SystemExit("error: the ToMCudaGraphs callback (configs/callbacks/cuda_graphs.yaml) needs a GPU, and CUDA is not available on this machine")
        if "16" in precision and "mixed" in precision and not torch.cuda.is_available():
            warnings.warn(f"precision {precision} on a CPU runs slowly and is not what the benchmark measures", stacklevel=1)
        logger = config.trainer.logger
        logger_path = getattr(logger, "class_path", "") if logger not in (None, True, False) else ""
        if "Wandb" in str(logger_path) and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no WANDB_API_KEY, logging offline (sync later with `wandb sync`)", file=sys.stderr)

    def instantiate_trainer(self, **kwargs):
        config = self.config.get(self.subcommand, self.config)
        # the configured list (trainer.callbacks, instantiated), which a `callbacks` keyword would otherwise replace
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        callbacks = configured + list(kwargs.get("callbacks") or [])
        present = {type(c) for c in callbacks}
        callbacks += [kind() for kind in MEASUREMENTS if kind not in present]
        if self.subcommand == "predict":
            callbacks.append(NiftiMaskWriter(output_dir=config.get("output_dir")))
        recorders = [c for c in callbacks if isinstance(c, RunRecorder)] or [RunRecorder()]
        for recorder in recorders:
            recorder.path = config.get("run_record") or recorder.path
            recorder.reported_checkpoint = config.get("report_checkpoint", "last")
        # the run record goes last: its on_fit_end reads what the other callbacks measured
        kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, RunRecorder)] + recorders
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        # the masks go to disk: keeping every case's mask in memory as well would only cost memory
        if self.config_init.predict.get("return_predictions") is None:
            self.config_init.predict.return_predictions = False

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        if self.config.fit.get("report_checkpoint") == "best":
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            if not best:
                raise SystemExit("error: --report_checkpoint best, but no best checkpoint was written (no validation ran?)")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        else:  # the final weights, still in memory: no checkpoint is chosen on the cases the test scores
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None)


def doctor() -> int:
    """Print the environment facts that decide what runs where."""
    import platform

    import segresmamba
    from segresmamba.provenance import device_name, git_sha, versions
    from segresmamba.ssm import backend_status

    print(f"segresmamba {segresmamba.__version__} (git {git_sha()}), python {platform.python_version()}")
    for pkg, ver in versions().items():
        print(f"  {pkg:12s} {ver}")
    print(f"device: {device_name()}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"  CUDA {torch.version.cuda}, compute capability sm_{cap[0]}{cap[1]}, {torch.cuda.device_count()} GPU(s)")
    print("scan backends:")
    for name, status in backend_status().items():
        print(f"  {name:10s} {status}")
    print(f"models: {', '.join(segresmamba.list_models())}")
    return 0


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["doctor"]:
        raise SystemExit(doctor())
    SegResMambaCLI(
        SegmentationTask,
        VolumeDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
