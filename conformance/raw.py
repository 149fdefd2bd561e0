"""Raw ABI sessions for conformance tests: container, group and device fds opened through a Host,
closed in reverse order whatever the test did."""

from __future__ import annotations

import errno
import os
import re
import struct
import time

import pytest

from vfio_impl import uapi

from .backends import DeviceInfo


def errno_of(fn, *args) -> int:
    """0 when the call succeeds, else its errno: misuse tests compare these."""
    try:
        fn(*args)
        return 0
    except OSError as e:
        return e.errno


def wired_vectors(host, bdf: str, index: str) -> set[int]:
    """The vectors of a device's "msi" or "msix" index the kernel has wired to an eventfd: it
    requests each one's handler as vfio-msix[N](BDF) (vfio_pci_intrs.c), which /proc/interrupts
    lists until the vector is unwired. Allocated vectors with no eventfd have no handler there."""
    names = re.findall(rf"\bvfio-{index}\[(\d+)\]\({re.escape(bdf)}\)", host.read_text("/proc/interrupts"))
    return {int(n) for n in names}


def profile_of(vfio):
    """The kernel profile a test's version-dependent answers come from. A real kernel that no
    profile models has no documented answers to hold the test to, so the test skips."""
    if vfio.profile is None:
        pytest.skip(f"no kernel profile models {vfio.kernel}: its answers here are not documented")
    return vfio.profile


def wait_for(predicate, timeout: float = 2.0) -> bool:
    """Kernel work such as virqfd unmask is asynchronous on Linux too: poll briefly."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.0005)
    return True


def assert_fast_path_back_after(dev, ms: int) -> None:
    """The mmap timer of either flavour, on the virtual clock: still trapping a millisecond before the deadline, mmapped at it."""
    clock = dev.machine.clock
    clock.advance(ms - 1)
    assert not dev.mmap_enabled(), f"the fast path came back before {ms} ms"
    clock.advance(1)
    assert dev.mmap_enabled(), f"the fast path was not back after {ms} ms"


class RefusedAccess:
    """A region's host with every pread and pwrite refused with EIO, as a device that stopped
    answering makes the kernel answer; sound on real too, since the kernel never sees the call."""

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def pread(self, fd, n, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def pwrite(self, fd, data, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))


class RawSession:
    def __init__(self, host, dev: DeviceInfo | None):
        self.host = host
        self.dev = dev
        self._fds: list[int] = []

    def track(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close_fd(self, fd: int) -> None:
        self._fds.remove(fd)
        self.host.close(fd)

    def container(self) -> int:
        return self.track(self.host.open("/dev/vfio/vfio", os.O_RDWR))

    def group(self, number: int | None = None) -> int:
        path = self.dev.group_path if number is None else f"/dev/vfio/{number}"
        return self.track(self.host.open(path, os.O_RDWR))

    def set_container(self, group: int, container: int) -> None:
        self.host.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))

    def setup(self, iommu: int = uapi.VFIO_TYPE1v2_IOMMU) -> tuple[int, int]:
        c, g = self.container(), self.group()
        self.set_container(g, c)
        self.host.ioctl(c, uapi.VFIO_SET_IOMMU, iommu)
        return c, g

    def device(self, group: int, name: str | None = None) -> int:
        return self.track(self.host.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, (name or self.dev.bdf).encode() + b"\0"))

    def open_device(self, iommu: int = uapi.VFIO_TYPE1v2_IOMMU) -> tuple[int, int, int]:
        c, g = self.setup(iommu)
        return c, g, self.device(g)

    def eventfd(self) -> int:
        return self.track(self.host.eventfd())

    def close(self) -> None:
        for fd in reversed(self._fds):
            try:
                self.host.close(fd)
            except OSError:
                pass
        self._fds.clear()

    # -- small ABI helpers --------------------------------------------------------------------
    def region_info(self, device: int, index: int, argsz: int | None = None):
        buf = uapi.vfio_region_info.pack(index=index)
        if argsz is not None:
            buf = bytearray(max(argsz, len(buf)))
            uapi.vfio_region_info.pack_into(buf, 0, argsz=argsz, index=index)
        self.host.ioctl(device, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
        return uapi.vfio_region_info.unpack(buf), buf

    def irq_info(self, device: int, index: int):
        buf = uapi.vfio_irq_info.pack(index=index)
        self.host.ioctl(device, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf)
        return uapi.vfio_irq_info.unpack(buf)

    def config_read(self, device: int, offset: int, size: int) -> int:
        return int.from_bytes(self.host.pread(device, size, (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + offset), "little")

    def config_write(self, device: int, offset: int, size: int, value: int) -> None:
        self.host.pwrite(device, value.to_bytes(size, "little"), (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + offset)

    def bar_read(self, device: int, bar: int, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.host.pread(device, size, (bar << 40) + offset), "little")

    def bar_write(self, device: int, bar: int, offset: int, value: int, size: int = 4) -> None:
        self.host.pwrite(device, value.to_bytes(size, "little"), (bar << 40) + offset)

    def enable_device(self, device: int, master: bool = False) -> None:
        """Memory decode on, INTx not disabled, and bus master when the test DMAs or uses MSI."""
        cmd = self.config_read(device, 4, 2) | 0x2 | (0x4 if master else 0)
        self.config_write(device, 4, 2, cmd & ~0x400)


def chain_offsets(buf, offset: int) -> list[int]:
    """Where each capability of an info chain starts, by following `next`."""
    offsets = []
    while offset:
        offsets.append(offset)
        offset = uapi.vfio_info_cap_header.unpack(buf, offset).next
    return offsets
