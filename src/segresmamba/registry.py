"""One name per model.

Every architecture registers a factory under one string; that string is what configs, result rows and
plot legends carry (in the spirit of timm's ``_registry``). A factory takes
``(in_channels, out_channels, img_size, **kwargs)`` and returns an ``nn.Module`` whose forward maps
``(B, in_channels, *img_size)`` to ``(B, out_channels, *img_size)`` logits.

Each registration also carries facts about the net (:class:`ModelInfo`): its total stride and smallest
patch side, whether it has deep-supervision heads, its citation and the paper's parameter count where the
SegResMamba paper reports one. Sweeps and the profiler check a patch against these facts
(:func:`check_patch`) before any work starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

from torch import nn

ImgSize = Union[int, Sequence[int]]
ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model.

    Attributes:
        name: the registry name.
        factory: builds the net from ``(in_channels, out_channels, img_size, **kwargs)``.
        stride: total downsampling; every patch side must be a multiple of it. ``None`` for a net that plans
            its strides from the patch (``nnunet``), which then only needs sides of at least ``min_side``.
        min_side: smallest patch side the net accepts.
        deep_supervision: the factory takes ``deep_supervision=True`` and then returns a list of outputs in
            training (full resolution first).
        citation: the paper that defines the architecture.
        paper_params_m: parameters in millions reported in Das et al. 2025, Table 7 (BTCV config), or None.
    """

    name: str
    factory: ModelFactory
    stride: int | None
    min_side: int
    deep_supervision: bool
    citation: str
    paper_params_m: float | None = None


_MODELS: dict[str, ModelInfo] = {}
_MODEL_PACKAGE = "segresmamba.models"


def register_model(
    name: str,
    *,
    stride: int | None,
    citation: str,
    min_side: int | None = None,
    deep_supervision: bool = False,
    paper_params_m: float | None = None,
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory`` under ``name`` (lower case, unique) with its :class:`ModelInfo`."""
    if name != name.lower():
        raise ValueError(f"model name {name!r} must be lower case")
    if stride is not None and stride < 1:
        raise ValueError(f"model {name!r}: stride must be >= 1 or None, got {stride}")
    if not citation:
        raise ValueError(f"model {name!r}: a registration needs the citation of its architecture")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS and _MODELS[name].factory is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].factory.__module__}")
        side = min_side if min_side is not None else (stride or 1)
        _MODELS[name] = ModelInfo(name, factory, stride, side, deep_supervision, citation, paper_params_m)
        return factory

    return decorator


def _load_models() -> None:
    importlib.import_module(_MODEL_PACKAGE)  # importing the package registers every model it holds


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _load_models()
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model; ValueError naming the known models otherwise."""
    _load_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def normalize_img_size(img_size: ImgSize) -> tuple[int, int, int]:
    """``128`` or ``(128, 128, 128)`` -> ``(128, 128, 128)``; rejects anything not 3 positive ints."""
    size = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise ValueError(f"img_size must be one positive int or three, got {img_size!r}")
    return size  # type: ignore[return-value]


def check_patch(name: str, img_size: ImgSize) -> tuple[int, int, int]:
    """Check a training patch against the model's stride and smallest side, before any work starts.

    Returns the patch as three ints; raises ValueError naming the model, the patch and a patch that would do.
    """
    info = model_info(name)
    size = normalize_img_size(img_size)
    stride = info.stride or 1
    bad_stride = any(s % stride for s in size)
    bad_side = any(s < info.min_side for s in size)
    if bad_stride or bad_side:
        fixed = tuple(max(info.min_side, -(-s // stride) * stride) for s in size)
        need = [f"every side >= {info.min_side}"] + ([f"divisible by {stride} (its total stride)"] if stride > 1 else [])
        raise ValueError(f"{name} needs a patch with {' and '.join(need)}; got {size}, use e.g. {fixed}")
    return size


def create_model(name: str, in_channels: int, out_channels: int, img_size: ImgSize, **kwargs) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: a name from :func:`list_models`.
        in_channels: image channels (BraTS 4, CT 1).
        out_channels: output channels (BraTS regions 3; BTCV 14 and Spleen 2 including background).
        img_size: training patch size, one int or (D, H, W); sliding-window inference uses the same.
        kwargs: architecture settings passed to the factory (see each model's docstring).
    """
    info = model_info(name)
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
    return info.factory(in_channels=in_channels, out_channels=out_channels, img_size=normalize_img_size(img_size), **kwargs)
