"""SegResMamba benchmark suite: SegResMamba (Das et al., MIDL 2025) and its rivals under one pipeline."""

# first: it notes whether CUBLAS_WORKSPACE_CONFIG was set before MONAI, which later imports set it
from segresmamba import cublas_env  # noqa: F401  isort: skip
from segresmamba.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "__version__"]
__version__ = "0.1.0"
