"""Network architectures (by name) and self-describing model files."""

from . import compact, unet  # noqa: F401  (registers the architectures)
from .registry import count_parameters, create_model, flops_per_pattern, list_models, register_model

__all__ = ["count_parameters", "create_model", "flops_per_pattern", "list_models", "register_model"]
