"""The memoir checkpoint format: what is written next to a model, and every check on the way back.

Files (all written by :func:`write_checkpoint`, read and checked by :func:`read_checkpoint`):

- ``memoir_config.json``: format and library version, the MemoirConfig, the patched target, the
  base-model fingerprint, the generated prefixes, the next edit id, a checksum of the masks.
- ``memoir_memory.safetensors``: W_m of the patched layer, the TopHash permutation, background and
  spread (checkpoints from before the spread existed load with a spread of ones), and, for a memory
  written with ``protect_earlier_edits``, the second moment of its edits' keys.
- ``memoir_masks.safetensors``: the packed bit masks and their edit ids.
- ``memoir_index.faiss``: the FAISS binary index, a cache of the masks (rebuilt if stale).
- ``memoir_edits.jsonl``: one JSON line an edit.
- ``memoir_deltas.safetensors``: what each edit added to W_m (its columns and values), for the
  edits written with ``keep_edit_deltas``; optional (checkpoints without it load, their edits are
  then removable from routing only).

The records of removed edits are kept in ``memoir_config.json`` under ``removed_edits``.

No pickle anywhere: JSON, safetensors and FAISS's own index format, so loading runs no code.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import SPREAD_AGGREGATION, MemoirConfig
from ..editing.inputs import MERGED_KEY, valid_merged_ids
from ..errors import MemoirError
from ..memory.earlier_keys import EarlierKeys
from ..memory.store import EditDelta, EditRecord, EditStore
from .atomic import folder_path

FORMAT_VERSION = 3
"""The newest format this library reads. Version 2 added the spread the standardized aggregation divides
by, and the earlier edits' keys with the ``protect_earlier_edits`` setting; version 3 the
``unprotected_steps`` setting."""
NEWER_SETTINGS = {"protect_earlier_edits": (0.0, 2), "unprotected_steps": (0, 3)}
"""Settings an older reader does not know: their default (left out of the manifest at it) and the format
that added them."""
CONFIG_FILE = "memoir_config.json"
MEMORY_FILE = "memoir_memory.safetensors"
MASKS_FILE = "memoir_masks.safetensors"
INDEX_FILE = "memoir_index.faiss"
EDITS_FILE = "memoir_edits.jsonl"
DELTAS_FILE = "memoir_deltas.safetensors"
MEMOIR_FILES = (CONFIG_FILE, MEMORY_FILE, MASKS_FILE, INDEX_FILE, EDITS_FILE, DELTAS_FILE)
CHECKSUMMED_FILES = (MEMORY_FILE, EDITS_FILE, DELTAS_FILE)
"""Files whose SHA-256 the manifest records (the masks have their own checksum; the FAISS index is checked
against the masks and rebuilt if stale)."""
_RECORD_FIELDS = {"edit_id", "prompt", "target", "metadata", "created", "success", "loss"}


class CheckpointError(MemoirError):
    """A checkpoint file is missing, corrupt, inconsistent or from a newer format."""


@dataclass
class Checkpoint:
    """Everything a memoir checkpoint holds, checked for consistency."""

    folder: Path
    manifest: dict[str, Any]
    config: MemoirConfig
    memory_weight: torch.Tensor
    permutation: torch.Tensor
    background: torch.Tensor
    spread: torch.Tensor
    earlier_keys: EarlierKeys | None
    codes: np.ndarray
    records: list[EditRecord]
    deltas: dict[int, EditDelta]
    removed: list[EditRecord]

    @property
    def module_name(self) -> str:
        return self.manifest["target"]["module_name"]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["base_model_fingerprint"]


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def write_checkpoint(folder: Path, *, manifest: dict[str, Any], memory_weight: torch.Tensor,
                     permutation: torch.Tensor, background: torch.Tensor, spread: torch.Tensor,
                     earlier_keys: EarlierKeys | None, store: EditStore) -> None:
    """Write the checkpoint files into ``folder`` (normally a temporary folder; see atomic_folder); the
    FAISS index only where faiss is installed."""
    module = manifest["target"]["module_name"]
    settings = _without_newer_defaults(manifest["memoir_config"])
    manifest = {**manifest, "memoir_config": settings}
    version = str(format_version(settings))
    memory = {f"{module}.memory_weight": _cpu(memory_weight), f"{module}.tophash.permutation": _cpu(permutation),
              f"{module}.tophash.background": _cpu(background), f"{module}.tophash.spread": _cpu(spread)}
    if earlier_keys is not None:
        memory[f"{module}.earlier_keys.moment_sum"] = _cpu(earlier_keys.moment_sum)
        memory[f"{module}.earlier_keys.edits"] = torch.tensor(earlier_keys.edits, dtype=torch.int64)
    save_file(memory, folder / MEMORY_FILE, metadata={"format_version": version})
    edit_ids = torch.tensor([record.edit_id for record in store.records], dtype=torch.int64)
    save_file({"codes": torch.from_numpy(store.index.codes.copy()), "edit_ids": edit_ids}, folder / MASKS_FILE,
              metadata={"format_version": version, "n_bits": str(store.index.n_bits)})
    store.index.write_faiss(folder / INDEX_FILE)
    with open(folder / EDITS_FILE, "w", encoding="utf-8") as handle:
        for record in store.records:
            handle.write(json.dumps(record.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
    deltas = {f"{edit_id}.{part}": _cpu(getattr(delta, part)) for edit_id, delta in store.deltas.items()
              for part in ("columns", "values")}
    save_file(deltas, folder / DELTAS_FILE, metadata={"format_version": version})
    manifest = {**manifest, "format_version": int(version), "num_edits": len(store),
                "masks_sha256": _codes_checksum(store.index.codes),
                "files_sha256": {name: _file_checksum(folder / name) for name in CHECKSUMMED_FILES},
                "removed_edits": [record.to_dict() for record in store.removed]}
    (folder / CONFIG_FILE).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def _without_newer_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings an older reader would refuse as unknown are left out while they hold their default."""
    return {name: value for name, value in settings.items()
            if name not in NEWER_SETTINGS or value != NEWER_SETTINGS[name][0]}


def format_version(settings: dict[str, Any]) -> int:
    """The oldest format that holds a memory with these MemoirConfig settings (as written).

    Only a standardized memory or one written with a setting of :data:`NEWER_SETTINGS` away from its
    default needs a newer format than 1, so every other checkpoint stays readable by releases that read
    version 1, and those refuse the others as newer instead of misreading them.
    """
    versions = [NEWER_SETTINGS[name][1] for name in settings if name in NEWER_SETTINGS]
    if settings.get("aggregation") == SPREAD_AGGREGATION:
        versions.append(2)
    return max(versions, default=1)


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and check a checkpoint; CheckpointError says which file is wrong and how."""
    folder = folder_path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no memoir checkpoint at {folder}: the folder does not exist.")
    manifest = _read_manifest(folder)
    _check_file_checksums(folder, manifest.get("files_sha256", {}))
    target = manifest["target"]
    d_model, d_ff = target["d_model"], target["d_ff"]
    try:
        config = MemoirConfig.from_dict(manifest["memoir_config"])
    except MemoirError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid memoir_config: {error}") from None
    memory = _read_safetensors(folder / MEMORY_FILE)
    module = target["module_name"]
    weight = _tensor(memory, f"{module}.memory_weight", (d_model, d_ff), folder / MEMORY_FILE)
    permutation = _tensor(memory, f"{module}.tophash.permutation", (d_ff,), folder / MEMORY_FILE)
    background = _tensor(memory, f"{module}.tophash.background", (d_ff,), folder / MEMORY_FILE)
    spread = _spread(memory, f"{module}.tophash.spread", d_ff, config, folder / MEMORY_FILE)
    earlier_keys = _earlier_keys(memory, f"{module}.earlier_keys", d_ff, folder / MEMORY_FILE)
    codes, edit_ids = _read_masks(folder / MASKS_FILE, d_ff, manifest)
    records = _read_edits(folder / EDITS_FILE)
    if [record.edit_id for record in records] != edit_ids.tolist():
        raise CheckpointError(f"{folder / EDITS_FILE} lists edits {[r.edit_id for r in records][:10]}... but "
                              f"{MASKS_FILE} holds masks for {edit_ids.tolist()[:10]}...; the files do not belong "
                              "together.")
    deltas = _read_deltas(folder / DELTAS_FILE, set(edit_ids.tolist()), d_model, d_ff)
    removed_values = manifest.get("removed_edits", [])
    if not isinstance(removed_values, list):
        raise CheckpointError(f"{folder / CONFIG_FILE}: removed_edits must be a list of edit records; the file is "
                              "corrupt.")
    removed = [_record(values, f"{folder / CONFIG_FILE} removed_edits[{i}]") for i, values in enumerate(removed_values)]
    return Checkpoint(folder, manifest, config, weight, permutation, background, spread, earlier_keys, codes,
                      records, deltas, removed)


def restore_store(checkpoint: Checkpoint, store: EditStore) -> None:
    """Fill an empty EditStore from the checkpoint; reuse its FAISS index when it matches the masks."""
    store.index.add_codes(checkpoint.codes)
    store.records = list(checkpoint.records)
    store.deltas = dict(checkpoint.deltas)
    store.removed = list(checkpoint.removed)
    stored = [record.edit_id for record in checkpoint.records]
    store.next_id = max([int(checkpoint.manifest.get("next_edit_id", 0)), *(i + 1 for i in stored)])
    index_path = checkpoint.folder / INDEX_FILE
    if store.index.use_faiss and not store.index.adopt_faiss(index_path):
        reason = "missing" if not index_path.exists() else "inconsistent with the masks"
        warnings.warn(f"{index_path} is {reason}; rebuilt the index from {MASKS_FILE}. Save again to refresh it.",
                      stacklevel=3)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a memoir checkpoint (save one with "
                              "memoir.save_pretrained).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the file is corrupt.") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no format_version; the file is corrupt.")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this memoir_hf reads "
                              f"({FORMAT_VERSION}); upgrade memoir_hf.")
    missing = [key for key in ("memoir_config", "target", "base_model_fingerprint", "masks_sha256")
               if key not in manifest]
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(manifest.get("memoir_config"), dict):
        missing.append("a target and memoir_config object")
    elif not isinstance(target.get("module_name"), str) or \
            any(type(target.get(k)) is not int for k in ("d_model", "d_ff", "top_k")):
        missing.append("a target module_name (text) and d_model/d_ff/top_k (integers)")
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the file is corrupt.")
    wrong = [field for field, valid in _MANIFEST_FIELD_CHECKS.items()
             if field in manifest and not valid(manifest[field])]
    if wrong:
        raise CheckpointError(f"{path}: {', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong type; "
                              "the file was edited by hand or is corrupt.")
    return manifest


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) in (int, float) for v in value)


_MANIFEST_FIELD_CHECKS = {  # what the loader reads from the manifest beyond the target and config
    "base_model_fingerprint": lambda v: isinstance(v, dict) and _is_number_list(v.get("weight_probe", [])),
    "next_edit_id": lambda v: type(v) is int and v >= 0,
    "prefixes": lambda v: v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
    "base_model": lambda v: v is None or isinstance(v, str),
    "files_sha256": lambda v: isinstance(v, dict) and all(isinstance(digest, str) for digest in v.values()),
}
_RECORD_FIELD_TYPES = {"edit_id": (int,), "prompt": (str,), "target": (str,), "created": (str,), "success": (bool,),
                       "loss": (int, float)}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated: {error}") from None


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path} has no tensor {key!r}; it does not belong to this checkpoint.")
    if tuple(tensors[key].shape) != shape:
        raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}.")
    return tensors[key]


def _spread(tensors: dict[str, torch.Tensor], key: str, d_ff: int, config: MemoirConfig, path: Path) -> torch.Tensor:
    """The saved spread; a checkpoint written before the spread existed has none and divides by one."""
    if key in tensors or config.aggregation == SPREAD_AGGREGATION:
        spread = _tensor(tensors, key, (d_ff,), path)
        if not bool((spread > 0).all()) or not bool(spread.isfinite().all()):
            raise CheckpointError(f"{path}: {key} must be positive and finite; the file is corrupt.")
        return spread
    return torch.ones(d_ff, dtype=torch.float32)


def _earlier_keys(tensors: dict[str, torch.Tensor], prefix: str, d_ff: int, path: Path) -> EarlierKeys | None:
    """The saved second moment of earlier edits' keys; None for a memory written without protection."""
    if f"{prefix}.moment_sum" not in tensors and f"{prefix}.edits" not in tensors:
        return None
    moment_sum = _tensor(tensors, f"{prefix}.moment_sum", (d_ff, d_ff), path)
    edits = _tensor(tensors, f"{prefix}.edits", (), path)
    if edits.dtype != torch.int64 or int(edits) < 0 or not bool(moment_sum.isfinite().all()):
        raise CheckpointError(f"{path}: {prefix} must hold a finite moment and a non-negative edit count; the file "
                              "is corrupt.")
    keys = EarlierKeys(d_ff)
    keys.moment_sum = moment_sum.float()
    keys.edits = int(edits)
    return keys


def _read_masks(path: Path, d_ff: int, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    tensors = _read_safetensors(path)
    if "codes" not in tensors or "edit_ids" not in tensors:
        raise CheckpointError(f"{path} lacks 'codes' or 'edit_ids'; it is not a memoir mask file.")
    codes, edit_ids = tensors["codes"].numpy(), tensors["edit_ids"].numpy()
    width = (d_ff + 7) // 8
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != width:
        raise CheckpointError(f"{path}: masks are {codes.shape[1] * 8 if codes.ndim == 2 else '?'} bits wide "
                              f"({codes.dtype}), but the patched layer has d_ff={d_ff} ({width * 8} bits packed).")
    if len(edit_ids) != len(codes) or len(codes) != manifest.get("num_edits"):
        raise CheckpointError(f"{path} holds {len(codes)} masks and {len(edit_ids)} edit ids, but "
                              f"{CONFIG_FILE} records {manifest.get('num_edits')} edits.")
    if _codes_checksum(codes) != manifest["masks_sha256"]:
        raise CheckpointError(f"{path} does not match the checksum in {CONFIG_FILE}; the masks were changed or "
                              "belong to another save.")
    return codes, edit_ids


def _read_edits(path: Path) -> list[EditRecord]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is truncated or corrupt (not UTF-8: {error}).") from None
    # Not splitlines: an edit's text may hold U+2028, which json.dumps(ensure_ascii=False) writes unescaped.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} line {number} is not valid JSON ({error}).") from None
        records.append(_record(values, f"{path} line {number}"))
    return records


def _record(values: Any, where: str) -> EditRecord:
    if not isinstance(values, dict) or set(values) != _RECORD_FIELDS:
        raise CheckpointError(f"{where} must hold exactly {sorted(_RECORD_FIELDS)}.")
    wrong = [name for name, kinds in _RECORD_FIELD_TYPES.items()
             if type(values[name]) not in kinds or (name == "edit_id" and values[name] < 0)]
    if wrong:
        raise CheckpointError(f"{where}: {', '.join(wrong)} of the wrong type; the file was edited by hand or is "
                              "corrupt.")
    if not isinstance(values["metadata"], dict) or not valid_merged_ids(values["metadata"]):
        raise CheckpointError(f"{where}: metadata must be a JSON object whose {MERGED_KEY!r}, if present, is a list "
                              "of edit ids (ints); the file was edited by hand or is corrupt.")
    return EditRecord(**values)


def _read_deltas(path: Path, edit_ids: set[int], d_model: int, d_ff: int) -> dict[int, EditDelta]:
    """The kept deltas, each checked against the stored edits and the layer's shape; {} if none were saved."""
    if not path.exists():
        if edit_ids:
            warnings.warn(f"{path} is missing: the {len(edit_ids)} stored edits load without their W_m deltas and "
                          "can only be withdrawn from routing (remove_edit(..., routing_only=True)).", stacklevel=3)
        return {}
    tensors = _read_safetensors(path)
    deltas = {}
    for key in tensors:
        name, _, part = key.partition(".")
        if not name.isdigit() or int(name) not in edit_ids or part not in ("columns", "values"):
            raise CheckpointError(f"{path}: tensor {key!r} names no stored edit; the files do not belong together.")
        edit_id = int(name)
        if edit_id in deltas:
            continue
        columns, values = tensors.get(f"{name}.columns"), tensors.get(f"{name}.values")
        if columns is None or values is None or columns.ndim != 1 or columns.dtype != torch.int64 \
                or tuple(values.shape) != (d_model, len(columns)) or len(columns) == 0 \
                or int(columns.min()) < 0 or int(columns.max()) >= d_ff or not bool((columns.diff() > 0).all()) \
                or not values.is_floating_point():
            raise CheckpointError(f"{path}: the delta of edit {edit_id} is incomplete or does not fit a layer of "
                                  f"d_model={d_model}, d_ff={d_ff}.")
        deltas[edit_id] = EditDelta(columns, values.float())
    return deltas


def _codes_checksum(codes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codes).tobytes()).hexdigest()


def _file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file_checksums(folder: Path, checksums: dict[str, str]) -> None:
    """Memory, records and deltas must be the files this save wrote (checkpoints written before the checksums
    carry none; a missing file is reported where it is read)."""
    for name in CHECKSUMMED_FILES:
        path = folder / name
        if name in checksums and path.is_file() and _file_checksum(path) != checksums[name]:
            raise CheckpointError(f"{path} does not match its checksum in {CONFIG_FILE}: it was changed after the "
                                  "save or comes from another checkpoint. Restore it from the same save.")


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()
