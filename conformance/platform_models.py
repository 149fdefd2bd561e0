"""The platform and AMBA devices the platform area knows, as Linux's vfio-platform and vfio-amba
show them on QEMU's virt board (the arm64 CI guest) and on the fake's platform topology: their
regions and IRQs, a register that names them, one that reads back what is written, and how the
suite makes the device raise and lower a level interrupt with register writes alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vfio_impl import uapi
from vfio_impl.flavours.platform import VFIOAmbaDevice, VFIOPlatformDevice

RW = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
MMAP = uapi.VFIO_REGION_INFO_FLAG_MMAP
EDGE = uapi.VFIO_IRQ_INFO_EVENTFD
LEVEL = EDGE | uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED

# PL031 (ARM DDI 0224): data, match, load, interrupt mask, masked status, clear; PrimeCell ID.
RTCDR, RTCMR, RTCLR, RTCIMSC, RTCMIS, RTCICR, RTC_PERIPH_ID0 = 0x00, 0x04, 0x08, 0x10, 0x18, 0x1C, 0xFE0
# platform-test (fakekernel/devices/platform_test.py): raise, lower, level, scratch.
PT_ID, PT_RAISE, PT_LOWER, PT_LEVEL, PT_SCRATCH = 0x00, 0x04, 0x08, 0x0C, 0x10


@dataclass(frozen=True)
class LevelIRQ:
    """A level interrupt the suite drives through the device's registers (each access a trapped
    or mapped MMIO of the flavour's `dev`): `raise_`, `lower` and `asserted`, the device's own
    view of its line."""

    pin: int
    raise_: Callable
    lower: Callable
    asserted: Callable


@dataclass(frozen=True)
class PlatformModel:
    name: str
    flavour: type
    compatible: str                     # the of_node's compatible list, as sysfs shows it
    regions: tuple[tuple[int, int], ...]  # (flags, size) by index
    irqs: tuple[int, ...]               # flags by index
    ident: tuple[int, int, int]         # (region, offset, value): a register that names the device
    scratch: tuple[int, int] | None = None   # (region, offset): a register that keeps a write
    level: LevelIRQ | None = None
    ram: int | None = None              # a region of plain memory

    @property
    def edge_pin(self) -> int | None:
        return next((pin for pin, flags in enumerate(self.irqs) if flags == EDGE), None)


def _pl031_raise(dev) -> None:
    """A match now: the mask lets it through, then the match and load registers are written with
    the same count, which QEMU's PL031 answers with an immediate match interrupt."""
    dev.mmio_write(0, RTCIMSC, 1, 4)
    dev.mmio_write(0, RTCMR, 0x10000, 4)
    dev.mmio_write(0, RTCLR, 0x10000, 4)


def _pt_line(offset: int) -> Callable:
    return lambda dev: dev.mmio_write(0, offset, 1, 4)


PLATFORM_MODELS = {m.name: m for m in (
    PlatformModel("pl031", VFIOAmbaDevice, "arm,pl031\0arm,primecell\0", ((RW | MMAP, 0x1000),), (LEVEL,),
                  (0, RTC_PERIPH_ID0, 0x31), scratch=(0, RTCMR),
                  level=LevelIRQ(0, _pl031_raise, lambda dev: dev.mmio_write(0, RTCICR, 1, 4),
                                 lambda dev: bool(dev.mmio_read(0, RTCMIS, 4) & 1))),
    PlatformModel("pl061", VFIOAmbaDevice, "arm,pl061\0arm,primecell\0", ((RW | MMAP, 0x1000),), (LEVEL,),
                  (0, 0xFE0, 0x61)),
    PlatformModel("virtio-mmio", VFIOPlatformDevice, "virtio,mmio\0", ((RW, 0x200),), (EDGE,),
                  (0, 0x000, 0x74726976)),
    PlatformModel("platform-test", VFIOPlatformDevice, "qemu,platform-test\0vfio,test-device\0",
                  ((RW | MMAP, 0x1000), (RW | MMAP, 0x2000)), (LEVEL, EDGE, LEVEL),
                  (0, PT_ID, 0x54414C50), scratch=(0, PT_SCRATCH),
                  level=LevelIRQ(0, _pt_line(PT_RAISE), _pt_line(PT_LOWER),
                                 lambda dev: bool(dev.mmio_read(0, PT_LEVEL, 4) & 1)),
                  ram=1),
)}

# What a platform test can ask of its device, and the devices that have it, best first: the
# virt board's come before the fake's own platform-test, so on the fake a test runs on the same
# model the arm64 guest offers, and platform-test stands in only for what no real board device
# can do (several IRQs, plain memory, a line raised by register on a pin beside an edge one).
ROLES: dict[str, tuple[str, Callable[[PlatformModel], bool]]] = {
    "any": ("device bound to vfio-platform or vfio-amba", lambda m: True),
    "mmap": ("device with an mmappable register region", lambda m: m.scratch is not None
             and bool(m.regions[m.scratch[0]][0] & MMAP)),
    "no-mmap": ("device with a region that cannot be mmapped", lambda m: any(not f & MMAP for f, _ in m.regions)),
    "level": ("device whose level IRQ the suite can raise by register", lambda m: m.level is not None),
    "edge": ("device with an edge IRQ", lambda m: m.edge_pin is not None),
    "amba": ("device bound to vfio-amba", lambda m: m.flavour is VFIOAmbaDevice),
    "platform": ("device bound to vfio-platform", lambda m: m.flavour is VFIOPlatformDevice),
    "several-irqs": ("device with a level IRQ raised by register and an edge IRQ beside it",
                     lambda m: m.level is not None and m.edge_pin is not None),
    "ram": ("device with a plain-memory region", lambda m: m.ram is not None),
}
PREFERENCE = ("pl031", "virtio-mmio", "pl061", "platform-test")
