"""virqfds and the thread that runs them (drivers/vfio/virqfd.c): a user's write to an eventfd
runs a handler in the kernel, as an unmask eventfd unmasks INTx; devices that serve a socket or
eventfds of their own are woken by the same thread, and so are their timers."""

from __future__ import annotations

import errno
import os
import selectors
import threading
import time
from typing import TYPE_CHECKING, Callable

from .err import error
from .eventfd import EventfdCtx

if TYPE_CHECKING:
    from .kernel import FakeKernel


def virqfd_add(kernel: "FakeKernel", ctx: EventfdCtx, handler: Callable[[], None]) -> None:
    """The handler runs once per write that finds the eventfd still wired."""
    def fire() -> None:
        if ctx.fd >= 0 and ctx.clear():
            handler()

    kernel.watch(ctx.fd, fire)


def virqfd_enable(kernel: "FakeKernel", current: EventfdCtx | None, fd: int,
                  handler: Callable[[], None]) -> EventfdCtx:
    """vfio_virqfd_enable: EBADF or EINVAL for a bad fd, EBUSY while one is already wired."""
    ctx = EventfdCtx(fd)
    if current is not None:
        ctx.put()
        raise error(errno.EBUSY, "a virqfd is already wired there")
    virqfd_add(kernel, ctx, handler)
    return ctx


def virqfd_disable(kernel: "FakeKernel", ctx: EventfdCtx | None) -> None:
    if ctx is not None:
        kernel.watch(ctx.fd, None)
        ctx.put()


# The longest the worker sleeps at once: epoll takes its timeout in int milliseconds, and a timer
# may be years away (a PL031 match behind its count).
MAX_SLEEP = 3600.0


class Timer:
    """A callback due at `deadline` (time.monotonic()); cancel() takes it back, as timer_del does."""

    __slots__ = ("deadline", "callback", "_pending")

    def __init__(self, deadline: float, callback: Callable[[], None], pending: list["Timer"]):
        self.deadline = deadline
        self.callback = callback
        self._pending = pending

    def cancel(self) -> None:
        if self in self._pending:
            self._pending.remove(self)


class Worker:
    """The kernel's worker: runs a callback, under the kernel lock, when a user writes an unmask
    eventfd, when a device's socket or eventfd has something to read, or when a device's timer
    is due."""

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._timers: list[Timer] = []
        self._running = True
        self._thread = threading.Thread(target=self._run, name="fake-virqfd", daemon=True)
        self._thread.start()

    def watch(self, fd: int, callback) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        if callback is not None:
            self._sel.register(fd, selectors.EVENT_READ, callback)
        os.eventfd_write(self._wake, 1)

    def watched(self) -> int:
        return len(self._sel.get_map()) - 1

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Under the kernel lock, as the device that arms a timer holds it."""
        timer = Timer(time.monotonic() + delay, callback, self._timers)
        self._timers.append(timer)
        os.eventfd_write(self._wake, 1)
        return timer

    def _sleep(self) -> float | None:
        """Until the next timer is due; None, with no timer, waits for an fd alone."""
        with self._lock:
            if not self._timers:
                return None
            return min(max(min(t.deadline for t in self._timers) - time.monotonic(), 0.0), MAX_SLEEP)

    def _fire_timers(self) -> None:
        if not self._timers:
            return
        with self._lock:
            now = time.monotonic()
            for timer in [t for t in self._timers if t.deadline <= now]:
                if timer in self._timers:  # an earlier callback may have cancelled it
                    self._timers.remove(timer)
                    timer.callback()

    def _run(self) -> None:
        while self._running:
            for key, _ in self._sel.select(self._sleep()):
                if key.data is None:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    key.data()
            self._fire_timers()

    def stop(self) -> None:
        self._running = False
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        self._sel.close()
        os.close(self._wake)
