"""SegResMamba benchmark suite: SegResMamba (Das et al., MIDL 2025) and its rivals under one pipeline."""

from segresmamba.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "__version__"]
__version__ = "0.1.0"
