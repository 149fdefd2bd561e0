"""What each catalog device looks like through vfio-pci on Linux 6.1, as the CI VM's QEMU 7.2
builds it (conformance/recordings/linux-6.1.json), and the parametrization that runs a test on
each of them with the marker that names it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vfio_impl import uapi

RW = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
MMAP = uapi.VFIO_REGION_INFO_FLAG_MMAP
CAPS = uapi.VFIO_REGION_INFO_FLAG_CAPS


@dataclass(frozen=True)
class Model:
    name: str
    ids: int  # the vendor/device dword
    class_rev: int  # the revision/class dword
    config_size: int
    # index -> (region flags, size, the BAR register after writing all ones)
    bars: dict
    caps: tuple  # (offset, id) in chain order
    ext_caps: tuple = ()  # (offset, id, version) from 0x100
    reset: bool = False
    interrupt_pin: int = 0


MODELS = {m.name: m for m in (
    Model("edu", 0x11E81234, 0x00FF0010, 256, {0: (RW | MMAP, 1 << 20, 0xFFF00000)}, ((0x40, 0x05),),
          interrupt_pin=1),
    Model("ivshmem", 0x11101AF4, 0x05000001, 256,
          {0: (RW | MMAP, 256, 0xFFFFFF00), 2: (RW | MMAP, 1 << 20, 0xFFF0000C), 3: (0, 0, 0xFFFFFFFF)}, ()),
    # The doorbell's BAR1 is its exclusive MSI-X BAR (table at 0, PBA at 2 KiB), BAR2 the server's
    # shared memory: 1 MiB wherever the suite runs, from the fake's per-test server or the VM's.
    Model("ivshmem-doorbell", 0x11101AF4, 0x05000001, 256,
          {0: (RW | MMAP, 256, 0xFFFFFF00), 1: (RW | MMAP | CAPS, 4096, 0xFFFFF000),
           2: (RW | MMAP, 1 << 20, 0xFFF0000C), 3: (0, 0, 0xFFFFFFFF)}, ((0x40, 0x11),)),
    Model("e1000e", 0x10D38086, 0x02000000, 4096,
          {0: (RW | MMAP, 128 << 10, 0xFFFE0000), 1: (RW | MMAP, 128 << 10, 0xFFFE0000), 2: (RW, 32, 0xFFFFFFE1),
           3: (RW | MMAP | CAPS, 16 << 10, 0xFFFFC000)},
          ((0xC8, 0x01), (0xD0, 0x05), (0xE0, 0x10), (0xA0, 0x11)), ((0x100, 0x01, 2), (0x140, 0x03, 1)),
          reset=True, interrupt_pin=1),
)}
ALL = tuple(MODELS)


def each(*names: str, **need):
    """Parametrize `model` over the named devices (all by default), each test id carrying
    `@pytest.mark.vfio(device=name, **need)` so a backend without it skips just that one."""
    return pytest.mark.parametrize("model", [pytest.param(MODELS[n], id=n, marks=pytest.mark.vfio(device=n, **need))
                                             for n in names or ALL])


def bar_of(model: Model, index: int) -> tuple[int, int, int]:
    """(flags, size, sized register) of a BAR; an absent one is all zeros."""
    return model.bars.get(index, (0, 0, 0))


class Access:
    """A device as the kernel shows it (raw, through its regions) or as a guest sees it
    (through VFIOPCIDevice); tests that hold on both take one of each."""

    def __init__(self, kind: str, raw, vfio_pci, **options):
        self.kind = kind
        self.dev = None
        if kind == "raw":
            _, _, self.fd = raw.open_device()
            self.raw = raw
        else:
            self.dev = vfio_pci(**options)

    def config_read(self, off: int, size: int) -> int:
        return self.dev.config_read(off, size) if self.dev else self.raw.config_read(self.fd, off, size)

    def config_write(self, off: int, size: int, value: int) -> None:
        if self.dev:
            self.dev.config_write(off, value, size)
        else:
            self.raw.config_write(self.fd, off, size, value)

    def bar_read(self, bar: int, off: int, size: int = 4) -> int:
        return self.dev.bar_read(bar, off, size) if self.dev else self.raw.bar_read(self.fd, bar, off, size)

    def bar_write(self, bar: int, off: int, value: int, size: int = 4) -> None:
        if self.dev:
            self.dev.bar_write(bar, off, value, size)
        else:
            self.raw.bar_write(self.fd, bar, off, value, size)


@pytest.fixture(params=["raw", "guest"])
def access(request, raw, vfio_pci):
    """The marker's device, once raw and once through the PCI flavour."""
    return Access(request.param, raw, vfio_pci)


def device_config(dev, off: int, size: int) -> int:
    """What the kernel answers for a realized device's config space, behind the flavour's back."""
    return int.from_bytes(dev.config_region.pread(off, size), "little")


def walk_caps(read) -> list[tuple[int, int]]:
    """(offset, id) along the standard capability list; `read(off, size)` is the view walked."""
    if not read(0x06, 2) & 0x10:
        return []
    chain, pos = [], read(0x34, 1)
    while pos and len(chain) < 48:
        chain.append((pos, read(pos, 1)))
        pos = read(pos + 1, 1)
    return chain
