"""memoir_hf: lifelong model editing for Hugging Face causal LMs with MEMOIR (arXiv 2506.07899)."""

from ._version import __version__ as __version__
from .config import MemoirConfig
from .editing.fact_files import read_facts
from .editing.result import EditResult
from .errors import (
    EditInputError,
    MemoirConfigError,
    MemoirError,
    PatchError,
    UnsupportedModelError,
)
from .feedback.correction import Correction, CorrectionReport
from .feedback.learning import LearnReport
from .feedback.log import Feedback, FeedbackLog
from .generation import Answer
from .management.consolidation import ConsolidationReport, OverlapGroup
from .memory.store import EditRecord
from .model import MemoirModel, patch
from .patching.registry import register_architecture, supported_model_types
from .patching.target import PatchTarget, find_target
from .persistence.atomic import SaveError
from .persistence.checkpoint import CheckpointError
from .persistence.fingerprint import FingerprintMismatchError
from .persistence.loading import load
from .routing.router import RoutingDecision

__all__ = [
    "Answer",
    "ConsolidationReport",
    "Correction",
    "CorrectionReport",
    "OverlapGroup",
    "read_facts",
    "EditInputError",
    "EditRecord",
    "EditResult",
    "Feedback",
    "FeedbackLog",
    "LearnReport",
    "CheckpointError",
    "FingerprintMismatchError",
    "MemoirConfig",
    "MemoirConfigError",
    "MemoirError",
    "MemoirModel",
    "PatchError",
    "PatchTarget",
    "RoutingDecision",
    "SaveError",
    "UnsupportedModelError",
    "find_target",
    "load",
    "patch",
    "register_architecture",
    "supported_model_types",
]
