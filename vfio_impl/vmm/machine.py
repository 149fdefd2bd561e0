"""What QEMU gives a device: an event loop, a clock, guest RAM for DMA, interrupt lines, and
the migration core that saves device state (or refuses to).

The clock is injectable so timers (such as the 1100 ms INTx mmap timeout) are tested by
advancing a VirtualClock, never by sleeping. A machine built with irqfd=True also plays KVM's
irqfd and resamplefd, and its MSI routes, so a device can hand its trigger eventfds to "the
hypervisor": an INTx to a guest line, an MSI or MSI-X vector to the message it sends.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import itertools
import mmap
import os
import selectors
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from vfio_impl.vmm.migration import Migration


class Clock(Protocol):
    def now_ms(self) -> float: ...


class RealClock:
    def now_ms(self) -> float:
        return time.monotonic() * 1000.0


class VirtualClock:
    """Time moves only when a test says so; the machine fires due timers on advance()."""

    def __init__(self) -> None:
        self._now = 0.0
        self.machine: "Machine | None" = None

    def now_ms(self) -> float:
        return self._now

    def advance(self, ms: float) -> None:
        target = self._now + ms
        while self.machine:
            due = self.machine.next_deadline()
            if due is None or due > target:
                break
            self._now = max(self._now, due)
            self.machine.run_timers()
        self._now = target


class Timer:
    """A one-shot timer that can be re-armed, like QEMU's QEMUTimer."""

    def __init__(self, machine: "Machine", callback: Callable[[], None]):
        self._machine = machine
        self._callback = callback
        self.deadline: float | None = None
        self._seq = 0

    def mod(self, deadline_ms: float) -> None:
        self.deadline = deadline_ms
        self._seq += 1
        heapq.heappush(self._machine._timers, (deadline_ms, next(self._machine._order), self, self._seq))

    def delete(self) -> None:
        self.deadline = None
        self._seq += 1

    @property
    def pending(self) -> bool:
        return self.deadline is not None

    def _fire(self, seq: int) -> None:
        if seq == self._seq and self.deadline is not None:
            self.deadline = None
            self._callback()


@dataclass
class IRQLine:
    """A guest interrupt line; tests watch its level and the history of edges."""

    name: str
    level: bool = False
    history: list[bool] = field(default_factory=list)

    def set(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            self.history.append(level)

    @property
    def raised(self) -> int:
        return self.history.count(True)


@dataclass
class RAMArea:
    """A piece of guest RAM: real anonymous memory at a guest physical address."""

    gpa: int
    size: int
    readonly: bool = False
    memory: mmap.mmap = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = mmap.mmap(-1, self.size)

    @property
    def vaddr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.memory))


@dataclass(slots=True, frozen=True)
class MSIRoute:
    """A GSI that KVM routes to an MSI message (kvm_irqchip_add_msi_route): its virq number."""

    virq: int
    address: int
    data: int


@dataclass(slots=True)
class IRQfd:
    """KVM's irqfd: a signalled trigger raises its GSI with no device code in between.

    A guest line without a resample eventfd takes an edge (asserted and lowered at once); with
    one the line stays up until the guest's EOI, which lowers it and writes the resample fd. An
    MSI route sends its message.
    """

    trigger: int
    gsi: IRQLine | MSIRoute
    resample: int | None = None


class MemoryListener(Protocol):
    def region_add(self, area: RAMArea) -> None: ...
    def region_del(self, area: RAMArea) -> None: ...


class Machine:
    """One VM's worth of loop, clock, memory and interrupts."""

    def __init__(self, clock: Clock | None = None, irqfd: bool = False):
        self.clock = clock or RealClock()
        if isinstance(self.clock, VirtualClock):
            self.clock.machine = self
        self.selector = selectors.DefaultSelector()
        # The handler of each fd the loop reads, kept beside the selector's own keys so that a
        # round can skip a handler removed since its select returned, as QEMU's loop does.
        self.fd_handlers: dict[int, Callable[[], None]] = {}
        self._timers: list = []
        self._order = itertools.count()
        self.ram: list[RAMArea] = []
        self.listeners: list[MemoryListener] = []
        self.irq_lines: dict[str, IRQLine] = {}
        self.msi_messages: list[tuple[int, int]] = []
        self.msi_handlers: list[Callable[[int, int], None]] = []
        # The irqfds live in their own epoll set, as KVM's live in the kernel: the device's
        # own fd handlers never see (or unregister) them. While it holds any, the set's fd is
        # one reader of the loop.
        self.migration = Migration()
        self.irqfd_available = irqfd
        self.irqfds: dict[int, IRQfd] = {}
        self.msi_routes: dict[int, MSIRoute] = {}
        self._virqs = itertools.count()
        self._kvm = selectors.DefaultSelector()

    # -- loop ---------------------------------------------------------------------------------
    def set_fd_handler(self, fd: int, handler: Callable[[], None] | None) -> None:
        """Like qemu_set_fd_handler: None removes the reader."""
        if self.fd_handlers.pop(fd, None) is not None:
            self.selector.unregister(fd)
        if handler is not None:
            self.selector.register(fd, selectors.EVENT_READ, handler)
            self.fd_handlers[fd] = handler

    def has_fd_handler(self, fd: int) -> bool:
        return fd in self.fd_handlers

    def new_timer(self, callback: Callable[[], None]) -> Timer:
        return Timer(self, callback)

    def next_deadline(self) -> float | None:
        while self._timers:
            deadline, _, timer, seq = self._timers[0]
            if seq == timer._seq and timer.deadline is not None:
                return deadline
            heapq.heappop(self._timers)
        return None

    def run_timers(self) -> None:
        now = self.clock.now_ms()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer, seq = heapq.heappop(self._timers)
            timer._fire(seq)

    def poll(self, timeout: float | None = 0) -> int:
        """One loop iteration: run ready fd handlers, then due timers. Returns handlers run.

        A handler an earlier one removed in the same round is not run, as in QEMU's loop."""
        ran = 0
        handlers = self.fd_handlers
        if handlers:
            for key, _ in self.selector.select(timeout):
                if handlers.get(key.fd) is key.data:
                    key.data()
                    ran += 1
        if self._timers:
            self.run_timers()
        return ran

    def run_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while not predicate():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, 0.05))
        return True

    # -- memory -------------------------------------------------------------------------------
    def add_ram(self, gpa: int, size: int, readonly: bool = False) -> RAMArea:
        area = RAMArea(gpa, size, readonly)
        self.ram.append(area)
        for listener in self.listeners:
            listener.region_add(area)
        return area

    def remove_ram(self, area: RAMArea) -> None:
        self.ram.remove(area)
        for listener in self.listeners:
            listener.region_del(area)

    def register_listener(self, listener: MemoryListener) -> None:
        """Replays existing RAM, as memory_listener_register does."""
        self.listeners.append(listener)
        for area in self.ram:
            listener.region_add(area)

    def unregister_listener(self, listener: MemoryListener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    # -- interrupts ---------------------------------------------------------------------------
    def irq_line(self, name: str) -> IRQLine:
        return self.irq_lines.setdefault(name, IRQLine(name))

    def msi_notify(self, address: int, data: int) -> None:
        self.msi_messages.append((address, data))
        for handler in self.msi_handlers:
            handler(address, data)

    # -- KVM's irqfd, resamplefd and MSI routes -----------------------------------------------
    def add_msi_route(self, address: int, data: int) -> MSIRoute:
        """kvm_irqchip_add_msi_route; OSError ENOSYS on a machine without irqfd, which has no
        GSI routing either."""
        if not self.irqfd_available:
            raise OSError(errno.ENOSYS, "this machine has no irqfd")
        route = MSIRoute(next(self._virqs), address, data)
        self.msi_routes[route.virq] = route
        return route

    def release_virq(self, route: MSIRoute) -> None:
        """kvm_irqchip_release_virq, once no irqfd uses the route."""
        self.msi_routes.pop(route.virq, None)

    def add_irqfd(self, trigger: int, gsi: IRQLine | MSIRoute, resample: int | None = None) -> IRQfd:
        """kvm_irqchip_add_irqfd_notifier; OSError as KVM answers: ENOSYS without irqfd, EBUSY twice."""
        if not self.irqfd_available:
            raise OSError(errno.ENOSYS, "this machine has no irqfd")
        if trigger in self.irqfds:
            raise OSError(errno.EBUSY, f"eventfd {trigger} is already an irqfd")
        irqfd = IRQfd(trigger, gsi, resample)
        self._kvm.register(trigger, selectors.EVENT_READ, irqfd)
        if not self.irqfds:
            self.set_fd_handler(self._kvm.fileno(), self._kvm_run)
        self.irqfds[trigger] = irqfd
        return irqfd

    def remove_irqfd(self, trigger: int) -> None:
        """Before the trigger eventfd is closed: epoll would keep a closed fd another holder dup'ed."""
        if self.irqfds.pop(trigger, None) is not None:
            self._kvm.unregister(trigger)
            if not self.irqfds:
                self.set_fd_handler(self._kvm.fileno(), None)

    def _kvm_run(self) -> None:
        for key, _ in self._kvm.select(0):
            irqfd = key.data
            try:
                os.eventfd_read(irqfd.trigger)
            except BlockingIOError:
                continue
            if isinstance(irqfd.gsi, MSIRoute):
                self.msi_notify(irqfd.gsi.address, irqfd.gsi.data)
                continue
            irqfd.gsi.set(True)
            if irqfd.resample is None:
                irqfd.gsi.set(False)

    def eoi(self, name: str) -> bool:
        """The guest's EOI on a line: a resampling irqfd on it lowers it and writes its resample
        eventfd. Returns whether one did; a line with no irqfd is the device model's business."""
        done = False
        for irqfd in list(self.irqfds.values()):
            if irqfd.resample is not None and irqfd.gsi.name == name:
                irqfd.gsi.set(False)
                os.eventfd_write(irqfd.resample, 1)
                done = True
        return done

    def close(self) -> None:
        for area in list(self.ram):
            self.remove_ram(area)
            area.memory.close()
        self._kvm.close()
        self.selector.close()
