"""The thread-safety rule of a MemoirModel: model calls share, changes to the memory are exclusive.

Forward and generate calls hold the lock shared, so any number run at once, each with its own
routing state. Whatever changes the memory (an edit, a removal, consolidation, calibration) or
rewires the model for a moment (an edit's frozen-prefix cache, saving the base model) holds it
exclusively: it waits for the calls in flight to finish, and calls that start meanwhile wait for
it. A forward therefore sees the memory as it was before an edit or after it, never half of one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn

from .errors import MemoirError

F = TypeVar("F", bound=Callable[..., Any])


class FreshWhenCopied:
    """A copy or unpickled model gets a fresh instance: no lock held, no call in flight."""

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class SharedExclusiveLock(FreshWhenCopied):
    """A readers-writer lock, re-entrant in both modes, that lets a waiting writer go first.

    The thread holding it exclusively may also take it shared (an edit checks itself with a forward
    pass). A thread holding it only shared cannot upgrade: that would wait for itself.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0
        self._local = threading.local()

    def _shared_depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        depth = self._shared_depth()
        if depth == 0 and self._writer != me:
            with self._condition:
                while self._writer is not None or self._writers_waiting:
                    self._condition.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0 and self._writer != me:
                with self._condition:
                    self._readers -= 1
                    self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._shared_depth():  # also in the library's own passes, made while this thread holds it exclusively
            raise MemoirError("the memory cannot be changed from inside a forward or generate call on the "
                              "same model (for example from a hook or a streamer); change it after the call.")
        if self._writer != me:
            with self._condition:
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._condition.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
        self._writer_depth += 1
        try:
            yield
        finally:
            self._writer_depth -= 1
            if self._writer_depth == 0:
                with self._condition:
                    self._writer = None
                    self._condition.notify_all()


class SharedEvalMode(FreshWhenCopied):
    """``module.eval()`` while any thread runs it through the library; the caller's mode returns after the last.

    If each call switched to eval and back on its own, one thread's restore would turn dropout back
    on under another thread's call still running.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._was_training = False

    @contextmanager
    def __call__(self, module: nn.Module) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._was_training = module.training
                module.eval()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    module.train(self._was_training)


def exclusive(method: F) -> F:
    """Run a MemoirModel method with the memory lock held exclusively."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._memory_lock.exclusive():
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def shared(method: F) -> F:
    """Run a MemoirModel method with the memory lock held shared."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._memory_lock.shared():
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]
