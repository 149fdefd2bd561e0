"""QEMU's trace points as structured events: logged, and visible to hooks that tests assert on."""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("vfio")
_hooks: list[Callable[[str, dict], None]] = []
_log_enabled_for = log.isEnabledFor
_DEBUG = logging.DEBUG


def tracing() -> bool:
    """Whether an event would reach a hook or the log: a hot path asks first, so an access with
    nobody listening does not pay for its fields (QEMU's trace points test their state too)."""
    return True if _hooks else _log_enabled_for(_DEBUG)


def trace(event: str, **fields) -> None:
    if _hooks:
        for hook in list(_hooks):
            hook(event, fields)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))


def warn(message: str) -> None:
    trace("warning", message=message)
    log.warning("%s", message)


def error_report(message: str) -> None:
    """QEMU's error_report: the guest-facing paths say what failed and carry on."""
    trace("error", message=message)
    log.error("%s", message)


class TraceRecorder:
    """A context manager collecting (event, fields) pairs, for tests."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def __call__(self, event: str, fields: dict) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict]:
        return [f for e, f in self.events if e == event]

    def __enter__(self) -> "TraceRecorder":
        _hooks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _hooks.remove(self)
