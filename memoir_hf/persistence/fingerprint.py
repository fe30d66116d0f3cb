"""Which base model a memory belongs to: layout plus a hash of the patched layer's frozen weight."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import MemoirError
from ..patching.target import PatchTarget

_PROBE_SIZE = 64
# Relative error of a weight stored in the coarsest dtype a base may be loaded in (bfloat16).
_LOW_PRECISION_RTOL = 1e-2
_STRUCTURE = ("model_type", "module_name", "num_layers", "d_model", "d_ff")


class FingerprintMismatchError(MemoirError):
    """The saved memory was written on another base model."""


def base_fingerprint(model: torch.nn.Module, target: PatchTarget, weight: torch.Tensor, *,
                     conv1d: bool) -> dict[str, Any]:
    """Layout of the patched layer and a hash of its frozen weight (canonical [d_model, d_ff], float32)."""
    values = weight.detach().to("cpu", torch.float32)
    values = (values.T if conv1d else values).contiguous()
    positions = torch.linspace(0, values.numel() - 1, _PROBE_SIZE).long()
    return {
        "model_type": target.model_type,
        "name_or_path": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        "module_name": target.module_name,
        "num_layers": target.num_layers,
        "d_model": target.d_model,
        "d_ff": target.d_ff,
        "weight_dtype": str(weight.dtype).removeprefix("torch."),
        "weight_sha256": hashlib.sha256(values.numpy().tobytes()).hexdigest(),
        "weight_probe": values.flatten()[positions].tolist(),
    }


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise FingerprintMismatchError naming both models unless ``current`` is the saved base.

    The same dtype must give the same hash exactly; a base loaded in another dtype must agree on a
    probe of its weights within that dtype's rounding.
    """
    differences = [f"{key} {saved.get(key)!r} vs {current.get(key)!r}" for key in _STRUCTURE
                   if saved.get(key) != current.get(key)]
    same_hash = saved.get("weight_sha256") == current.get("weight_sha256")
    recast = saved.get("weight_dtype") != current.get("weight_dtype") and _probes_agree(saved, current)
    if not differences and not same_hash and not recast:
        differences.append(f"weights of {current['module_name']} differ "
                           f"(hash {saved.get('weight_sha256', '')[:12]} vs {current['weight_sha256'][:12]})")
    if differences:
        raise FingerprintMismatchError(
            f"this memoir checkpoint was saved on base model {_describe(saved)} but is being attached to "
            f"{_describe(current)}: {'; '.join(differences)}. Load the base model the edits were made on."
        )


def check_model_type(saved: dict[str, Any], model: torch.nn.Module) -> None:
    """The cheap first check, before the model's layout is resolved: the same model family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != saved.get("model_type"):
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "(unnamed)")
        raise FingerprintMismatchError(
            f"this memoir checkpoint was saved on base model {_describe(saved)} but is being attached to "
            f"{name!r} ({model_type}). Load the base model the edits were made on.")


def _probes_agree(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    a = torch.tensor(saved.get("weight_probe", []), dtype=torch.float32)
    b = torch.tensor(current["weight_probe"], dtype=torch.float32)
    return a.shape == b.shape and torch.allclose(a, b, rtol=_LOW_PRECISION_RTOL, atol=1e-6)


def _describe(fingerprint: dict[str, Any]) -> str:
    name = fingerprint.get("name_or_path") or "(unnamed)"
    return f"{name!r} ({fingerprint.get('model_type')}, {fingerprint.get('module_name')})"
