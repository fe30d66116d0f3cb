"""MemoirConfig: every setting of the method in one validated dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .editing.inputs import valid_unicode
from .errors import MemoirConfigError

SPREAD_AGGREGATION = "standardized"
"""The aggregation that divides by each feature's spread over the background (saved with the memory)."""
AGGREGATIONS = ("mean_minus_background", SPREAD_AGGREGATION, "mean", "last")
DEFAULT_AGGREGATION = "mean_minus_background"  # the paper's
MIN_SPREAD_TEXTS = 2
AUTOCAST_DTYPES = (None, "bfloat16", "float16")
STRUCTURAL = ("layer", "top_k", "aggregation", "seed", "background_prompts")

# The paper edits layer 27 of LLaMA-3-8B's 32: a late layer, at this fraction of the depth.
DEFAULT_LAYER_FRACTION = 27 / 32
# The paper's k = 4096 of d_ff = 14336.
DEFAULT_TOP_K = 4096 / 14336
# torch.Generator.manual_seed takes seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1


@dataclass
class MemoirConfig:
    """Settings of a MEMOIR memory. Defaults follow the paper (arXiv 2506.07899).

    Structural settings (``layer``, ``top_k``, ``aggregation``, ``seed``, ``background_prompts``) are
    fixed when a model is patched; the others (``threshold`` and the optimiser settings) may be changed
    at any time, and every assignment is validated.
    """

    layer: int | str | None = None
    """Decoder layer whose MLP down projection gets the memory: an index (negative counts from
    the top), a module name, or None for a late layer (27/32 of the depth, as in the paper)."""
    top_k: int | float = DEFAULT_TOP_K
    """Active columns per mask: an int, or a fraction of d_ff in (0, 1)."""
    threshold: float = 0.5
    """Routing threshold tau: a prompt uses the memory when its best mask overlap is >= tau."""
    aggregation: str = DEFAULT_AGGREGATION
    """How the down projection inputs of the prompt tokens become one vector before top-k: their
    ``mean``, the ``last`` token, the mean minus a background mean of unrelated text (the paper), or
    that difference divided by each feature's spread over the unrelated text (``standardized``: keeps
    features that are large for every prompt out of the masks)."""
    seed: int = 0
    """Seed of the fixed TopHash permutation."""
    learning_rate: float = 1.0
    weight_decay: float = 1e-5
    """Pulls each edit's own change to W_m toward zero; what earlier edits wrote is never decayed."""
    max_grad_norm: float = 1.0
    max_steps: int = 30
    stop_loss: float = 0.02
    """Stop an edit early once the target loss is below this."""
    protect_earlier_edits: float = 0.0
    """How strongly a new edit avoids moving what earlier edits' tokens read from W_m: each step is
    taken in the metric I + μC, with C the second moment of those tokens' masked keys (see
    ``editing.trainer.train_columns``). 0 is the paper's write. Above 0 the memory keeps C, a
    d_ff x d_ff float32 matrix (9 MB on SmolLM2-135M, 822 MB on LLaMA-3-8B)."""
    unprotected_steps: int = 0
    """With ``protect_earlier_edits`` > 0: up to this many more steps, in the plain metric, for an edit written
    against earlier edits' keys (every edit but a memory's first protected one) whose loss is still above
    ``stop_loss`` after ``max_steps``. The protection can leave an edit stuck (the
    directions its target needs are the ones earlier edits read); these steps let it land, at the cost
    to earlier edits of these steps alone. An edit that is only slow (its loss just above ``stop_loss``,
    its target already the argmax) takes them too. 0 leaves a stuck edit as it is."""
    edit_autocast: str | None = None
    """None trains edits in the model's dtype. "bfloat16" or "float16" runs each optimisation step
    under torch.autocast (steps 1.25x faster on this project's CPU with bf16 support); W_m, its update and the
    success check stay in the model's dtype, so an edit that autocast under-trains reports failure."""
    keep_edit_deltas: bool = True
    """Keep what each edit adds to W_m (d_model x k float32 numbers an edit: 1 MB on
    SmolLM2-135M, 64 MB on LLaMA-3-8B), in memory and in the checkpoint, so that
    ``remove_edit`` can take it out exactly. Turn it off for big models or many edits; ``remove_edit``
    then only withdraws an edit from routing."""
    prefix_starts: tuple[str, ...] = ("I", "You", "Because", "Yes", "Q: ")
    """Starts of the context prefixes the model generates once for prefix augmentation."""
    prefix_lengths: tuple[int, ...] = (5, 10)
    """New tokens generated per prefix start: one prefix per (start, length) pair."""
    background_prompts: tuple[str, ...] | None = field(default=None)
    """Texts for the background vector; None uses the generic prompts shipped in the package."""

    def __new__(cls, *args: Any, **settings: Any) -> MemoirConfig:
        # The dataclass __init__ would reject a misspelt setting with a bare TypeError.
        _check_known_settings(cls, settings)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name in ("prefix_starts", "prefix_lengths", "background_prompts"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name)))
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not getattr(self, "_validated", False):
            object.__setattr__(self, name, value)
            return
        _check_known_settings(type(self), [name])
        if name in STRUCTURAL and getattr(self, "_locked", False):
            raise MemoirConfigError(f"{name} is fixed once a model is patched (the stored masks depend on it); "
                                    "patch a fresh model with a new MemoirConfig to change it.")
        if name in ("prefix_starts", "prefix_lengths", "background_prompts"):
            value = _as_tuple(name, value)
        previous = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except MemoirConfigError:
            object.__setattr__(self, name, previous)
            raise

    def lock_structure(self) -> None:
        """Called when a model is patched with this config: structural settings may no longer change."""
        object.__setattr__(self, "_locked", True)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **explicit: Any) -> MemoirConfig:
        """Settings from a YAML file, overridden by the MEMOIR_* environment variables, then by ``explicit``.

        See :mod:`memoir_hf.config_sources` for the variables and the precedence.
        """
        from .config_sources import load_config

        return load_config(path, **explicit)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MemoirConfig:
        _check_known_settings(cls, values)
        return cls(**values)

    def validate(self) -> None:
        _check_layer(self.layer)
        _check_top_k(self.top_k)
        _check_number("threshold", self.threshold, low=0.0, high=1.0)
        if self.aggregation not in AGGREGATIONS:
            raise MemoirConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        _check_int("seed", self.seed, low=0, high=MAX_SEED)
        _check_number("learning_rate", self.learning_rate, low=0.0, low_open=True, finite=True)
        _check_number("weight_decay", self.weight_decay, low=0.0, finite=True)
        _check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        _check_int("max_steps", self.max_steps, low=1)
        _check_number("stop_loss", self.stop_loss, low=0.0)
        _check_number("protect_earlier_edits", self.protect_earlier_edits, low=0.0, finite=True)
        _check_int("unprotected_steps", self.unprotected_steps, low=0)
        if not isinstance(self.keep_edit_deltas, bool):
            raise MemoirConfigError(f"keep_edit_deltas must be True or False, got {self.keep_edit_deltas!r}.")
        if self.edit_autocast not in AUTOCAST_DTYPES:
            raise MemoirConfigError(f"edit_autocast must be one of {AUTOCAST_DTYPES}, got {self.edit_autocast!r}.")
        if not all(isinstance(s, str) and s and valid_unicode(s) for s in self.prefix_starts):
            raise MemoirConfigError("prefix_starts must be non-empty strings of valid Unicode (use () to turn prefix "
                                    "augmentation off).")
        for n in self.prefix_lengths:
            _check_int("each of prefix_lengths", n, low=1)
        if self.background_prompts is not None and (
            not self.background_prompts
            or not all(isinstance(p, str) and p.strip() and valid_unicode(p) for p in self.background_prompts)
        ):
            raise MemoirConfigError("background_prompts must be a non-empty list of non-empty strings of valid "
                                    "Unicode, or None.")
        check_spread_texts(self.aggregation, self.background_prompts)

    def resolve_top_k(self, d_ff: int) -> int:
        """The number of active columns for a layer of width d_ff."""
        k = self.top_k if isinstance(self.top_k, int) else round(self.top_k * d_ff)
        if not 1 <= k <= d_ff:
            raise MemoirConfigError(f"top_k={self.top_k!r} gives k={k} columns, but the layer has d_ff={d_ff}; "
                                    f"use an int in [1, {d_ff}] or a fraction in (0, 1).")
        return k


def check_spread_texts(aggregation: str, texts: Sequence[str] | None) -> None:
    """The standardized aggregation divides by a spread over the background texts: it needs different ones."""
    if aggregation != SPREAD_AGGREGATION or texts is None:
        return
    distinct = len(set(texts))
    if distinct < MIN_SPREAD_TEXTS:
        raise MemoirConfigError(f"the standardized aggregation divides by each feature's spread over the background "
                                f"prompts, which needs at least {MIN_SPREAD_TEXTS} different texts; got {distinct}. "
                                "Give more background_prompts, or None for the ones shipped with memoir_hf.")


def _check_known_settings(cls: type[MemoirConfig], names: Iterable[str]) -> None:
    known = cls.keys()
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(name), known, n=1))
             else repr(name) for name in unknown]
    raise MemoirConfigError(f"MemoirConfig has no setting {', '.join(hints)}; known settings: {', '.join(known)}.")


def _as_tuple(name: str, value: Any) -> tuple | None:
    if value is None and name == "background_prompts":
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise MemoirConfigError(f"{name} must be a list or tuple, got {type(value).__name__} {value!r:.40}.")
    return tuple(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: int | float) -> float | None:
    """The value as a float (what the optimiser computes with), None for an int too large for one."""
    try:
        return float(value)
    except OverflowError:
        return None


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise MemoirConfigError(f"{name} must be an int {bounds}, got {value!r}.")


def _check_number(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False,
                  finite: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    ok = ok and _as_float(value) is not None and (not finite or math.isfinite(value))
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise MemoirConfigError(f"{name} must be a {'finite ' if finite else ''}number {bounds}, got {value!r}.")


def _check_layer(layer: Any) -> None:
    if layer is None or _is_int(layer) or (isinstance(layer, str) and layer.strip()):
        return
    raise MemoirConfigError(f"layer must be an int index, a module name, or None for the default; got {layer!r}.")


def _check_top_k(top_k: Any) -> None:
    if _is_int(top_k):
        if top_k <= 0:
            raise MemoirConfigError(f"top_k must be a positive int or a fraction in (0, 1), got {top_k}.")
        return
    if isinstance(top_k, float) and 0.0 < top_k < 1.0:
        return
    raise MemoirConfigError(f"top_k must be a positive int or a fraction of d_ff in (0, 1), got {top_k!r}.")
