"""memoir_hf: lifelong model editing for Hugging Face causal LMs with MEMOIR (arXiv 2506.07899)."""

from .config import MemoirConfig
from .editing.result import EditResult
from .errors import (
    EditInputError,
    MemoirConfigError,
    MemoirError,
    PatchError,
    UnsupportedModelError,
)
from .memory.store import EditRecord
from .model import MemoirModel, patch
from .patching.registry import register_architecture, supported_model_types
from .patching.target import PatchTarget, find_target
from .routing.router import RoutingDecision

__version__ = "0.1.0"

__all__ = [
    "EditInputError",
    "EditRecord",
    "EditResult",
    "MemoirConfig",
    "MemoirConfigError",
    "MemoirError",
    "MemoirModel",
    "PatchError",
    "PatchTarget",
    "RoutingDecision",
    "UnsupportedModelError",
    "find_target",
    "patch",
    "register_architecture",
    "supported_model_types",
]
