"""``segresmamba fit|validate|test|predict``: the Lightning CLI over every model and dataset.

Configs stack with ``-c``, one folder per concern: ``configs/trainer/``, ``configs/model/``, ``configs/data/``,
``configs/recipe/`` (the training recipe) and ``configs/callbacks/`` (optional callbacks, appended to the
default list with ``trainer.callbacks+``); any setting can be overridden on the command line
(``--model.net unetr``, ``--trainer.max_epochs 5``).
With no data config the embedded synthetic BraTS-like data is used. ``segresmamba doctor`` reports the
environment (torch, CUDA, GPU, scan backends).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segresmamba.bench.configs import read_yaml
from segresmamba.callbacks import PeakMemory, RunRecorder, StepTimer
from segresmamba.cpu_bf16 import TOLERANCE, bf16_conv3d_weight_grad_error, bf16_fit_refusal
from segresmamba.data.base import VolumeDataModule
from segresmamba.errors import InputError, command_line, plain_message
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
# Options are never abbreviated (--trainer.max_epoch is refused, not taken as max_epochs), and a refused
# setting is raised (then shown as one line by main) instead of printed with the usage text
PARSER_KWARGS = {"default_env": False, "allow_abbrev": False, "exit_on_error": False}
# What the model takes from the data; a checkpoint must agree on each before its weights are loaded
CHECKPOINT_FACTS = ("net", "in_channels", "out_channels", "task")
# Lightning's names for checkpoints it finds itself (not file paths)
CHECKPOINT_NAMES = ("last", "best", "hpc")


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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads the checkpoint's settings next: a missing or unreadable file is named here first
        self.checkpoint = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in CHECKPOINT_NAMES and not str(ckpt_path).startswith("registry"):
            self.checkpoint = read_checkpoint_facts(ckpt_path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a setting the model, the data or the trainer refuses when built
            raise InputError(plain_message(err)) from err

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        precision = str(config.trainer.precision)
        accelerator = str(config.trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise InputError("trainer.accelerator asks for a GPU but CUDA is not available on this machine")
        callbacks = [str(getattr(c, "class_path", "")).rsplit(".", 1)[-1] for c in config.trainer.callbacks or []]
        graph_configs = {"ToMCudaGraphs": "configs/callbacks/cuda_graphs.yaml", "StepCudaGraphs": "configs/callbacks/step_graphs.yaml"}
        graphed = [name for name in graph_configs if name in callbacks]
        if graphed and not torch.cuda.is_available():
            raise InputError(f"the {graphed[0]} callback ({graph_configs[graphed[0]]}) needs a GPU, and CUDA is not available on this machine")
        if len(graphed) == 2:
            raise InputError("StepCudaGraphs (configs/callbacks/step_graphs.yaml) already holds the ToM layers: drop ToMCudaGraphs "
                             "(configs/callbacks/cuda_graphs.yaml)")
        if "StepCudaGraphs" in callbacks and int(getattr(config.trainer, "accumulate_grad_batches", 1) or 1) != 1:
            raise InputError(f"StepCudaGraphs (configs/callbacks/step_graphs.yaml) needs trainer.accumulate_grad_batches 1, "
                             f"got {config.trainer.accumulate_grad_batches}")
        if "16" in precision and "mixed" in precision and not torch.cuda.is_available():
            warnings.warn(f"precision {precision} on a CPU runs slowly and is not what the benchmark measures", stacklevel=1)
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        refusal = bf16_fit_refusal(precision, on_cpu) if self.subcommand == "fit" else None
        if refusal:
            raise InputError(refusal)
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

    def check_checkpoint_fits(self) -> None:
        """Before Lightning loads ``--ckpt_path``: its model must be the one these settings build (name,
        channels, classes from the data, every weight's shape), else InputError naming the file, the
        setting and both values instead of a state_dict size mismatch."""
        if self.checkpoint is None:
            return
        path, hparams, shapes = self.checkpoint
        here = self.model.hparams
        differ = [f"{key} is {hparams[key]!r} in the checkpoint but {here.get(key)!r} here"
                  for key in CHECKPOINT_FACTS if key in hparams and hparams[key] != here.get(key)]
        if not differ:
            own = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
            differ = [f"weight {k} has shape {shape} in the checkpoint but {own[k]} here"
                      for k, shape in shapes.items() if k in own and own[k] != shape][:3]
        if differ:
            raise InputError(f"checkpoint {path} does not fit the model these settings build "
                             f"(model.net, and the data's channels and classes): {'; '.join(differ)}")

    before_fit = before_validate = before_test = check_checkpoint_fits

    def before_predict(self) -> None:
        self.check_checkpoint_fits()
        # the masks go to disk: keeping every case's mask in memory as well would only cost memory
        if self.config_init.predict.get("return_predictions") is None:
            self.config_init.predict.return_predictions = False

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        if self.config.fit.get("report_checkpoint") == "best":
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            if not best:
                raise InputError("--report_checkpoint best, but no best checkpoint was written (no validation ran?)")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        else:  # the final weights, still in memory: no checkpoint is chosen on the cases the test scores
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None)


def read_checkpoint_facts(path: str) -> tuple[str, dict, dict[str, tuple[int, ...]]]:
    """(path, saved settings, weight shapes) of a Lightning checkpoint; InputError naming a file that is
    missing or not a readable checkpoint."""
    if not Path(path).is_file():
        raise InputError(f"ckpt_path {path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a truncated copy has lost its zip directory
        raise InputError(f"ckpt_path {path}: not a PyTorch checkpoint (not a zip archive: truncated, or another kind of file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a damaged archive
        raise InputError(f"ckpt_path {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise InputError(f"ckpt_path {path}: not a Lightning checkpoint (it has no state_dict)")
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    return path, dict(checkpoint.get("hyper_parameters") or {}), shapes


# Triton whose compiled ToM kernels were measured faster than those of the GPU machines' Triton 3.6: one fused
# ToM layer (C48, 64^3 tokens, bf16) forward and backward took 0.81x the time on an H200 (results/perf/triton_ab.md)
FASTER_TRITON = (3, 9)


def triton_advice(triton_version: str | None, on_gpu: bool) -> str | None:
    """A line for ``doctor`` where the installed Triton compiles the suite's GPU kernels into slower code than a
    newer one would (measured), else None."""
    if not on_gpu or not triton_version:
        return None
    from segresmamba.ssm.triton.tuning import triton_release

    if triton_release(triton_version) >= FASTER_TRITON:  # an unparsable version counts as the newest
        return None
    return (f"triton {triton_version}: the ToM layer's Triton kernels ran 0.81x as long compiled by Triton "
            f"{'.'.join(map(str, FASTER_TRITON))} (torch 2.13) on an H200 (results/perf/triton_ab.md, before the mirrored scan "
            "backward closed part of that gap); a newer torch trains faster")


def doctor() -> int:
    """Print the environment facts that decide what runs where."""
    import platform

    import segresmamba
    from segresmamba.provenance import device_name, git_sha, versions
    from segresmamba.ssm import backend_status

    print(f"segresmamba {segresmamba.__version__} (git {git_sha()}), python {platform.python_version()}")
    installed = versions()
    for pkg, ver in installed.items():
        print(f"  {pkg:12s} {ver}")
    print(f"device: {device_name()}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"  CUDA {torch.version.cuda}, compute capability sm_{cap[0]}{cap[1]}, {torch.cuda.device_count()} GPU(s)")
    advice = triton_advice(installed.get("triton"), torch.cuda.is_available())
    if advice:
        print(f"note: {advice}")
    error = bf16_conv3d_weight_grad_error()
    verdict = "ok" if error <= TOLERANCE else "WRONG: train on the CPU in 32-true (bf16-mixed fits are refused here)"
    print(f"CPU bf16 conv3d weight gradient: relative error {error:.3g} on a 2x2x2 map ({verdict})")
    print("scan backends:")
    for name, status in backend_status().items():
        print(f"  {name:10s} {status}")
    if installed.get("triton"):
        from segresmamba.ssm.triton.tuning import mirrored_backward

        how = "mirrored, a forward scan of each chunk read backwards" if mirrored_backward(installed["triton"]) else "a reverse scan"
        print(f"  the Triton scan's backward runs its right-to-left recurrence as {how} (TUNING['bwd_mirror'])")
    print(f"models: {', '.join(segresmamba.list_models())}")
    return 0


CLI_KWARGS: dict[str, Any] = {
    "subclass_mode_data": True,
    "save_config_kwargs": {"overwrite": True},
    "parser_kwargs": PARSER_KWARGS,
    "auto_configure_optimizers": False,
}


class _ParserBuilt(Exception):
    def __init__(self, parser: LightningArgumentParser) -> None:
        super().__init__()
        self.parser = parser


class _ParserOnly(SegResMambaCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raise _ParserBuilt(parser)  # LightningCLI builds its parser in __init__ and offers no way to stop after it


@functools.cache
def cli_parser() -> LightningArgumentParser:
    """The parser of ``segresmamba fit|validate|test|predict``, built once: ``cli_parser().parse_args(["fit",
    "-c", ...])`` checks a command's settings (an ``argparse.ArgumentError`` names a refused one) without
    building the model, the data or the trainer."""
    try:
        _ParserOnly(SegmentationTask, VolumeDataModule, **CLI_KWARGS)
    except _ParserBuilt as built:
        return built.parser
    raise RuntimeError("LightningCLI parsed no arguments")


def check_config_files(args: list[str]) -> None:
    """Every ``-c``/``--config`` file given is YAML: a syntax error names the file and its line (the CLI's
    own reader names neither)."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if value is not None and Path(value).is_file():
            read_yaml(value)


def _is_data_setup_error(err: BaseException) -> bool:
    """Whether ``err`` was raised while a data module prepared or set up its cases (bad data, not a bug)."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("prepare_data", "setup") and isinstance(frame.f_locals.get("self"), LightningDataModule):
            return True
        tb = tb.tb_next
    return False


def cli_error_message(err: BaseException) -> str | None:
    """The one line a user sees for ``err``, or None for a bug (which keeps its traceback)."""
    if isinstance(err, (InputError, argparse.ArgumentError)):
        return plain_message(err)
    if isinstance(err, ValueError) and _is_data_setup_error(err):
        return str(err)
    return None


def run(args: list[str]) -> int:
    """``segresmamba <args>``; errors are raised (see :func:`main`)."""
    if args[:1] == ["doctor"]:
        return doctor()
    # main hands the arguments over itself (less --debug); Lightning would warn that sys.argv has them too
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    check_config_files(args)
    SegResMambaCLI(SegmentationTask, VolumeDataModule, args=args, **CLI_KWARGS)
    return 0


def main(args: list[str] | None = None) -> int:
    """The ``segresmamba`` command: a bad setting or file is one line naming it, exit status 2
    (``--debug`` or SEGRESMAMBA_DEBUG=1: with its traceback)."""
    return command_line(run, args, describe=cli_error_message)


if __name__ == "__main__":
    raise SystemExit(main())
