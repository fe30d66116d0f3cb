"""Router: decides once per prompt, per sequence, which stored edit (if any) each sequence reads.

A forward pre-hook on the patched model records what kind of call is coming (a prompt pass, or a
decoding step over a KV cache) and which tokens are prompt tokens (the attention mask, or an
explicit prompt mask). The memory layer then asks the router for the decision: computed from the
prompt pass, and reused unchanged for every decoding step.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import MemoirConfig
from ..errors import MemoirError
from ..fingerprint.tophash import TopHash
from ..memory.layer import RoutedRows
from ..memory.store import EditStore


@dataclass(frozen=True)
class RoutingDecision:
    """What one sequence of the last call read from the memory."""

    edit_id: int | None
    """The edit whose columns this sequence read, or None."""
    overlap: float | None
    """Best overlap with any stored edit (None when the memory is empty or disabled)."""
    nearest_edit_id: int | None = None
    """The best-overlapping edit, even when its overlap is below the threshold."""

    @property
    def routed(self) -> bool:
        return self.edit_id is not None


class _CallState(threading.local):
    """What one thread's model call is doing: each thread routes its own calls, so threads that call
    the model at the same time never see each other's decisions."""

    def __init__(self) -> None:
        self.enabled = True
        self.decisions: list[RoutingDecision] = []
        self.routed: RoutedRows | None = None
        self.decided_batch: int | None = None
        self.prompt_pass = True
        self.batch_size: int | None = None
        self.token_mask: torch.Tensor | None = None
        self.explicit_prompt_mask: torch.Tensor | None = None
        self.in_generation = False
        self.generation_decided = False
        self.generation_mask: torch.Tensor | None = None
        """The [batch, seq] attention mask generate was called with (its forwards may get a 4D one)."""


class Router:
    def __init__(self, model: nn.Module, tophash: TopHash, store: EditStore, config: MemoirConfig):
        self.tophash = tophash
        self.store = store
        self.config = config
        self._signature = _forward_signature(model)
        self._var_keyword = [] if self._signature is None else [
            name for name, parameter in self._signature.parameters.items() if parameter.kind is parameter.VAR_KEYWORD]
        self._call = _CallState()

    def __getstate__(self) -> dict[str, Any]:
        """Copies start with fresh per-thread state (a threading.local cannot be copied)."""
        return {key: value for key, value in self.__dict__.items() if key != "_call"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._call = _CallState()

    @property
    def decisions(self) -> list[RoutingDecision]:
        """This thread's decisions for the sequences of its last prompt pass."""
        return self._call.decisions

    # -- called by the patched model and the memory layer ------------------------------------
    def before_model_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        arguments = self._bind(args, kwargs)
        inputs = arguments.get("input_ids")
        if inputs is None:
            inputs = arguments.get("inputs_embeds")
        self._call.batch_size = int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else None
        if self._call.in_generation:  # the first step of generate decides, whatever cache it was given
            self._call.prompt_pass = not self._call.generation_decided
        else:
            self._call.prompt_pass = _cache_is_empty(_cache_argument(arguments))
        if self._call.prompt_pass:
            explicit = self._call.explicit_prompt_mask
            if explicit is not None and (explicit.dim() != 2 or (isinstance(inputs, torch.Tensor)
                                                                 and tuple(explicit.shape) != tuple(inputs.shape[:2]))):
                shape = tuple(inputs.shape[:2]) if isinstance(inputs, torch.Tensor) else "no input_ids"
                raise MemoirError(f"prompt_mask must be [batch, seq] like the input ({shape}), "
                                  f"got {tuple(explicit.shape)}.")
            mask = explicit if explicit is not None else arguments.get("attention_mask")
            if not _is_2d(mask) and self._call.in_generation:  # a static cache's forwards get a 4D mask
                mask = self._call.generation_mask
            self._call.token_mask = mask if _is_2d(mask) else None

    def __call__(self, inputs: torch.Tensor) -> RoutedRows | None:
        batch = int(inputs.shape[0]) if inputs.dim() == 3 else self._call.batch_size
        if self._call.prompt_pass:
            self._call.routed = self._decide(inputs, batch)
            self._call.decided_batch = batch
            self._call.generation_decided = self._call.in_generation
        elif batch != self._call.decided_batch:
            raise MemoirError(
                f"a cached decoding step with batch size {batch} follows a prompt pass with batch size "
                f"{self._call.decided_batch}; run the prompt pass (an empty cache) for this batch first."
            )
        return self._call.routed

    # -- scopes -----------------------------------------------------------------------------
    @contextmanager
    def generation(self, attention_mask: Any = None) -> Iterator[None]:
        """Within generate: the first forward decides; every later step reuses it, cache or not.
        ``attention_mask`` is generate's own, for the forwards that get another form of it."""
        self._call.in_generation, self._call.generation_decided = True, False
        self._call.generation_mask = attention_mask if _is_2d(attention_mask) else None
        try:
            yield
        finally:
            self._call.in_generation, self._call.generation_decided = False, False
            self._call.generation_mask = None

    @contextmanager
    def preserved(self) -> Iterator[None]:
        """Library-internal passes (edit checks, prefix generation) leave the user's routing state as it was."""
        saved = (self._call.decisions, self._call.routed, self._call.decided_batch, self._call.generation_decided)
        try:
            yield
        finally:
            self._call.decisions, self._call.routed, self._call.decided_batch, self._call.generation_decided = saved

    @contextmanager
    def prompt_mask(self, mask: torch.Tensor | None) -> Iterator[None]:
        self._call.explicit_prompt_mask = mask
        try:
            yield
        finally:
            self._call.explicit_prompt_mask = None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self._call.enabled = self._call.enabled, False
        try:
            yield
        finally:
            self._call.enabled = previous

    # -- the decision -----------------------------------------------------------------------
    def _decide(self, inputs: torch.Tensor, batch: int) -> RoutedRows | None:
        if not self._call.enabled or len(self.store) == 0:
            self._call.decisions = [RoutingDecision(None, None)] * batch
            return None
        activations = inputs.reshape(batch, -1, inputs.shape[-1])
        token_mask = self._token_mask_for(activations)
        queries = self.tophash(activations, token_mask)
        positions, overlaps = self.store.nearest(queries)
        has_prompt = token_mask.sum(dim=1).cpu().numpy() > 0
        routed = has_prompt & (overlaps >= self.config.threshold)
        self._call.decisions = [self._decision(p, o, r) for p, o, r in zip(positions, overlaps, routed, strict=True)]
        rows = np.flatnonzero(routed)
        if len(rows) == 0:
            return None
        masks = torch.stack([self.store.mask(int(positions[r]), device=inputs.device, dtype=inputs.dtype)
                             for r in rows])
        return RoutedRows(batch, torch.as_tensor(rows, device=inputs.device), masks)

    def _decision(self, position: int, overlap: float, routed: bool) -> RoutingDecision:
        nearest = self.store.records[position].edit_id
        return RoutingDecision(nearest if routed else None, float(overlap), nearest)

    def _token_mask_for(self, activations: torch.Tensor) -> torch.Tensor:
        mask = self._call.token_mask
        batch, seq = activations.shape[:2]
        if mask is not None and mask.shape[0] == batch and mask.shape[1] > seq:  # it covers cached tokens too
            mask = mask[:, -seq:]
        if mask is None or tuple(mask.shape) != (batch, seq):
            return torch.ones(activations.shape[:2], device=activations.device)
        return mask.to(activations.device)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, with those a ``**kwargs`` parameter caught among them."""
        if self._signature is None:
            return kwargs
        try:
            arguments = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return kwargs
        for name in self._var_keyword:
            arguments = {**arguments.pop(name, {}), **arguments}
        return arguments


def _is_2d(mask: Any) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


def _forward_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")
"""Names the KV cache goes by in forward calls: transformers 5.24 renamed past_key_values to cache."""


def _cache_argument(arguments: dict[str, Any]) -> Any:
    return next((arguments[name] for name in CACHE_ARGUMENTS if arguments.get(name) is not None), None)


def _cache_is_empty(past_key_values: Any) -> bool:
    if past_key_values is None:
        return True
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length()) == 0
    if isinstance(past_key_values, (tuple, list)):
        return len(past_key_values) == 0 or past_key_values[0][0].shape[-2] == 0
    return False
