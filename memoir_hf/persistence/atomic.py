"""Write a checkpoint folder so that a crash never leaves it half-written.

Everything is written into a temporary folder beside the destination; files of the destination
that the new save does not write (for example a base model saved there earlier) are carried over
as hard links; then the two folders are swapped. On Linux the swap is one atomic
renameat2(RENAME_EXCHANGE); elsewhere it is two renames, and :func:`recover_interrupted_swap`
puts the previous folder back if a crash fell between them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import glob
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import MemoirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_PREVIOUS_TAG = ".memoir-previous-"
_TEMP_TAG = ".memoir-writing-"
_LOCK_TAG = ".memoir-lock"


@contextmanager
def atomic_file(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` (same suffix); on success it replaces it in one rename.

    A crash while writing leaves the previous file, or none, never a truncated one.
    """
    destination = Path(destination)
    temporary = destination.with_name(f".{destination.stem}{_TEMP_TAG}{uuid.uuid4().hex[:8]}{destination.suffix}")
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, destination)
        _fsync_directory(destination.parent)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_folder(destination: str | os.PathLike, *, owned: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it replaces ``destination`` whole.

    Files of ``destination`` the new save does not write are carried over, except those matching a
    glob pattern in ``owned`` (files this save is responsible for: a stale one must not survive).
    """
    destination = folder_path(destination)
    if destination.is_symlink():  # save into the folder it points to, and keep the link
        destination = destination.resolve()
    if destination.exists() and not destination.is_dir():
        raise MemoirError(f"cannot save to {destination}: it exists and is not a folder; choose a folder path.")
    if Path.cwd().resolve().is_relative_to(destination.resolve()):
        raise MemoirError(f"cannot save to {destination}: it is the current directory (or holds it), which a save "
                          "replaces whole; choose a checkpoint folder below it.")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with _save_lock(destination):
            _remove_stale_temporaries(destination)
            temporary = destination.parent / f".{destination.name}{_TEMP_TAG}{uuid.uuid4().hex[:8]}"
            temporary.mkdir()
            try:
                yield temporary
                if destination.exists():
                    _carry_over(destination, temporary, owned)
                _fsync_tree(temporary)
                _swap_in(temporary, destination)
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        if isinstance(error, SaveError):
            raise
        raise SaveError(f"could not save to {destination}: {error}. Nothing was changed there; free space or "
                        "fix the permissions and save again.") from error


def folder_path(value: Any) -> Path:
    """A checkpoint folder given as a path (str or PathLike), made absolute; MemoirError for anything else."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise MemoirError(f"a checkpoint folder must be given as a path (str or pathlib.Path), got {value!r}.")
    return Path(value).absolute()


class SaveError(MemoirError, OSError):
    """A save failed (disk full, no permission, another save holding the folder); the folder is unchanged."""


SAVE_LOCK_TIMEOUT = 60.0
"""Seconds a save waits for another process's save to the same folder before refusing."""


@contextmanager
def _save_lock(destination: Path) -> Iterator[None]:
    """Hold an advisory lock on ``destination`` for the whole save, so two processes (or threads) never
    write the same folder at once. The kernel releases it if the holder dies, and the holder deletes the
    lock file when done (a waiter that locked the deleted file tries again). No lock on non-POSIX systems."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = destination.parent / f".{destination.name}{_LOCK_TAG}"
    deadline = time.monotonic() + SAVE_LOCK_TIMEOUT
    descriptor = _locked_file(lock_path, deadline, destination)
    try:
        yield
    finally:
        os.unlink(lock_path)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _locked_file(lock_path: Path, deadline: float, destination: Path) -> int:
    """An open descriptor of ``lock_path``, locked, and still the file at that path."""
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SaveError(f"could not save to {destination}: another save to it is still running "
                                        f"(lock {lock_path.name}); try again when it has finished.") from None
                    time.sleep(0.05)
            if _same_file(lock_path, descriptor):
                return descriptor
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # the previous holder deleted the file we locked: lock the current one


def _same_file(path: Path, descriptor: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def recover_interrupted_swap(destination: str | os.PathLike) -> None:
    """If a save died between its two renames, move the previous folder back into place."""
    destination = folder_path(destination)
    if destination.exists():
        return
    previous = sorted(destination.parent.glob(f".{glob.escape(destination.name)}{_PREVIOUS_TAG}*"),
                      key=lambda path: path.stat().st_mtime)
    if previous:
        warnings.warn(f"{destination} was missing after an interrupted save; restored the previous checkpoint "
                      f"from {previous[-1].name}.", stacklevel=3)
        os.rename(previous[-1], destination)


def _carry_over(destination: Path, temporary: Path, owned: Collection[str]) -> None:
    """Bring the files, folders (empty ones too) and symbolic links of ``destination`` the save did not write."""
    for folder, folders, files in os.walk(destination):
        for name in folders + files:
            source = Path(folder) / name
            relative = source.relative_to(destination)
            target = temporary / relative
            if target.exists() or target.is_symlink() or any(fnmatch.fnmatch(str(relative), p) for p in owned):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():  # os.walk does not enter a linked folder: the link itself is kept
                os.symlink(os.readlink(source), target)
            elif source.is_dir():
                target.mkdir()
            else:
                _link_or_copy(source, target)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(temporary: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(temporary, destination)
    elif _exchange(temporary, destination):
        shutil.rmtree(temporary, ignore_errors=True)
    else:
        previous = destination.parent / f".{destination.name}{_PREVIOUS_TAG}{uuid.uuid4().hex[:8]}"
        os.rename(destination, previous)
        os.rename(temporary, destination)
        shutil.rmtree(previous, ignore_errors=True)
    _fsync_directory(destination.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2 (Linux); False where that is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _remove_stale_temporaries(destination: Path) -> None:
    for stale in destination.parent.glob(f".{glob.escape(destination.name)}{_TEMP_TAG}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
