"""virqfds and the thread that runs them (drivers/vfio/virqfd.c): a user's write to an eventfd
runs a handler in the kernel, as an unmask eventfd unmasks INTx; devices that serve a socket or
eventfds of their own are woken by the same thread."""

from __future__ import annotations

import errno
import os
import selectors
import threading
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


class Worker:
    """The kernel's worker: runs a callback, under the kernel lock, when a user writes an unmask
    eventfd, or when a device's socket or eventfd has something to read."""

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
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

    def _run(self) -> None:
        while self._running:
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    key.data()

    def stop(self) -> None:
        self._running = False
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        self._sel.close()
        os.close(self._wake)
