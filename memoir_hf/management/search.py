"""Find stored edits by text, metadata and outcome."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import MemoirError
from ..memory.store import EditRecord


def matching_edits(records: Iterable[EditRecord], text: str | None = None, *,
                   metadata: Mapping[str, Any] | None = None, success: bool | None = None) -> list[EditRecord]:
    """Records whose prompt or target contains ``text`` (case-insensitive), whose metadata holds every
    item of ``metadata``, and whose success is ``success``; None leaves a criterion out."""
    if text is not None and not isinstance(text, str):
        raise MemoirError(f"text must be a string, got {type(text).__name__}.")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise MemoirError(f"metadata must be a dict of the items to match, got {type(metadata).__name__}.")
    if success is not None and not isinstance(success, bool):
        raise MemoirError(f"success must be True, False or None, got {success!r}.")
    needle = text.casefold() if text else None
    return [r for r in records
            if (needle is None or needle in r.prompt.casefold() or needle in r.target.casefold())
            and all(key in r.metadata and r.metadata[key] == value for key, value in (metadata or {}).items())
            and (success is None or r.success == success)]
