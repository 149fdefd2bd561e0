"""A small MMIO block on the platform bus, for vfio-platform: one register page, one page pair
of RAM, and three interrupt lines (level, edge, level) a test raises and lowers by register.

The registers take 4-byte accesses only; other sizes read 0 and are dropped, as a bus that
decodes only word accesses answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from vfio_impl import uapi

if TYPE_CHECKING:
    from ..virqfd import Timer

ID = 0x54414C50  # "PLAT", little-endian
REG_ID, REG_IRQ_RAISE, REG_IRQ_LOWER, REG_IRQ_LEVEL, REG_SCRATCH, REG_RESET_COUNT = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14
REGS_SIZE = 0x1000
RAM_SIZE = 0x2000
VALID_SIZE = 4


@dataclass(frozen=True, slots=True)
class Resource:
    """One IORESOURCE_MEM of the device: `ram` regions are plain memory, the others trap."""

    size: int
    ram: bool = False
    readonly: bool = False


class PlatformDevice:
    """What the platform bus knows of a device: its resources, its interrupt lines (True is
    level-triggered), the bus flag the vfio driver reports for it, and `reset`, the reset
    function vfio-platform finds for it (by compatible, or ACPI _RST); most devices have none."""

    resources: tuple[Resource, ...] = ()
    irq_levels: tuple[bool, ...] = ()
    device_flags = uapi.VFIO_DEVICE_FLAGS_PLATFORM
    reset: Callable[[], None] | None = None

    def __init__(self) -> None:
        # The interrupt controller: (line, asserted); and the machine's timers (QEMU's timer_mod:
        # (seconds, callback) -> a Timer to cancel). Both set by the driver bound to the device.
        self.irq_sink: Callable[[int, bool], None] = lambda line, level: None
        self.call_later: Callable[[float, Callable[[], None]], Timer] | None = None

    def mmio_read(self, region: int, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, region: int, offset: int, size: int, value: int) -> None:
        pass

    def line(self, index: int) -> bool:
        return False


class PlatformTest(PlatformDevice):
    resources = (Resource(REGS_SIZE), Resource(RAM_SIZE, ram=True))
    irq_levels = (True, False, True)
    model = "platform-test"

    def __init__(self) -> None:
        super().__init__()
        self.lines = [False] * len(self.irq_levels)
        self.scratch = 0
        self.reset_count = 0

    def line(self, index: int) -> bool:
        return self.lines[index]

    def _set_lines(self, bits: int, asserted: bool) -> None:
        for n, level in enumerate(self.irq_levels):
            if not bits >> n & 1:
                continue
            if not level:
                if asserted:
                    self.irq_sink(n, True)
            elif self.lines[n] != asserted:
                self.lines[n] = asserted
                self.irq_sink(n, asserted)

    def mmio_read(self, region: int, offset: int, size: int) -> int:
        if region or size != VALID_SIZE:
            return 0
        if offset == REG_ID:
            return ID
        if offset == REG_IRQ_LEVEL:
            return sum(1 << n for n, up in enumerate(self.lines) if up)
        if offset == REG_SCRATCH:
            return self.scratch
        if offset == REG_RESET_COUNT:
            return self.reset_count
        return 0

    def mmio_write(self, region: int, offset: int, size: int, value: int) -> None:
        if region or size != VALID_SIZE:
            return
        if offset == REG_IRQ_RAISE:
            self._set_lines(value, True)
        elif offset == REG_IRQ_LOWER:
            self._set_lines(value, False)
        elif offset == REG_SCRATCH:
            self.scratch = value & 0xFFFFFFFF

    def reset(self) -> None:
        self._set_lines((1 << len(self.lines)) - 1, False)
        self.scratch = 0
        self.reset_count += 1
