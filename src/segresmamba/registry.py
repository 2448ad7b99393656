"""One name per model.

Every architecture registers a factory under one string; that string is what configs, result rows and
plot legends carry (in the spirit of timm's ``_registry``). A factory takes
``(in_channels, out_channels, img_size, **kwargs)`` and returns an ``nn.Module`` whose forward maps
``(B, in_channels, *img_size)`` to ``(B, out_channels, *img_size)`` logits.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Union

from torch import nn

ImgSize = Union[int, Sequence[int]]
ModelFactory = Callable[..., nn.Module]

_MODELS: dict[str, ModelFactory] = {}
_PLUGINS = ("segresmamba.nets", "baselines")
_plugins_loaded = False


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory`` under ``name`` (lower case, unique)."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name != name.lower():
            raise ValueError(f"model name {name!r} must be lower case")
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].__module__}")
        _MODELS[name] = factory
        return factory

    return decorator


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGINS:
        try:
            importlib.import_module(module)
        except ImportError as err:  # baselines/ is absent when the package is used without the repo
            warnings.warn(f"model plugin {module!r} not loaded ({err}); its models are unavailable", stacklevel=3)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _load_plugins()
    return sorted(_MODELS)


def normalize_img_size(img_size: ImgSize) -> tuple[int, int, int]:
    """``128`` or ``(128, 128, 128)`` -> ``(128, 128, 128)``; rejects anything not 3 positive ints."""
    size = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise ValueError(f"img_size must be one positive int or three, got {img_size!r}")
    return size  # type: ignore[return-value]


def create_model(name: str, in_channels: int, out_channels: int, img_size: ImgSize, **kwargs) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: a name from :func:`list_models`.
        in_channels: image channels (BraTS 4, CT 1).
        out_channels: output channels (BraTS regions 3; BTCV 14 and Spleen 2 including background).
        img_size: training patch size, one int or (D, H, W); sliding-window inference uses the same.
        kwargs: architecture settings passed to the factory (see each model's docstring).
    """
    _load_plugins()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
    return _MODELS[name](in_channels=in_channels, out_channels=out_channels, img_size=normalize_img_size(img_size), **kwargs)
