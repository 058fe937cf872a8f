"""Models: loading any local HF causal LM, architecture adapters, named hook sites."""

from engramlab.models import attention  # noqa: F401  (registers the pattern-exposing attention)
from engramlab.models.adapters import ArchAdapter, get_adapter, supported_model_types
from engramlab.models.hooks import SITE_DOCS, HookPoints
from engramlab.models.loading import LoadedModel, list_checkpoints, load_model, resolve_spec, wrap_model
from engramlab.models.tiny import tiny_model

__all__ = [
    "ArchAdapter", "HookPoints", "LoadedModel", "SITE_DOCS", "get_adapter", "list_checkpoints",
    "load_model", "resolve_spec", "supported_model_types", "tiny_model", "wrap_model",
]
