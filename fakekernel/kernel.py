"""FakeKernel: one object owning all fake state, driven through the same Host methods as Linux.

It is the syscall layer and the machine: the fd table, /dev/vfio, sysfs (with bind and unbind)
and /proc/interrupts, the devices of its topology and the drivers bound to them. The VFIO files
live in vfio_main.py (devices), group.py and container.py; the bus drivers in vfio_pci.py,
vfio_platform.py and vfio_ccw.py.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
import re
import threading
import weakref
from typing import Callable

from pyfakefs import fake_open, fake_os

from vfio_impl.core.host import EventfdMixin

from . import devices as _devices
from . import pci
from .container import ContainerFile
from .err import error
from .faults import Faults
from .firmware import pci_setup
from .group import GroupFile, IommuGroup
from .interrupts import Interrupts
from .iommu import PAGE_SIZE, IOMMUFault
from .profile import DEFAULT_PROFILE, Profile
from .sysfs import Sysfs
from .topology import PciDeviceSpec, Topology
from .vfio_ccw import VfioCcwDevice
from .vfio_main import DeviceFile, File, is_open
from .vfio_pci import VfioPciDevice
from .vfio_platform import BUS_DRIVERS, VfioPlatformDevice
from .virqfd import Timer, Worker

_GROUP_RE = re.compile(r"^/dev/vfio/(?:noiommu-)?(\d+)$")


def _not_vfio(fd: int) -> OSError:
    """What Linux answers a VFIO request on a fd that is not a VFIO file: EBADF when it is not
    open at all, ENOTTY when it is some other file."""
    return error(errno.EBADF if not is_open(fd) else errno.ENOTTY, f"fd {fd} is not a VFIO file")


class FakeKernel(EventfdMixin):
    """A Linux VFIO kernel in one process: /dev/vfio, sysfs, vfio-pci, type1, emulated devices."""

    kind = "fake"

    def __init__(self, topology: Topology | str | None = None, profile: Profile | str | None = None):
        if isinstance(topology, str):
            topology = Topology.named(topology)
        self.topology = topology or Topology.default()
        self.profile = profile if isinstance(profile, Profile) else Profile.named(profile or DEFAULT_PROFILE)
        self.functions: dict[str, pci.PciFunction] = {}
        try:  # a device that fails to come up (a doorbell with no server) leaves no socket of the others open
            for spec in self.topology.devices:
                self.functions[spec.bdf] = _devices.CATALOG[spec.model](**spec.options)
        except BaseException:
            for fn in self.functions.values():
                fn.stop()
            raise
        pci_setup(self.topology.devices, self.functions)
        models = {d.name: _devices.CATALOG[d.model]() for d in self.topology.platform}
        self.sysfs = Sysfs(self.topology, self.functions, models)
        self.fs = self.sysfs.fs
        self.interrupts = Interrupts(self.fs)
        self._os = fake_os.FakeOsModule(self.fs)
        self._open = fake_open.FakeFileOpen(self.fs)
        self.files: dict[int, File] = {}
        self.groups = {n: IommuGroup(n, self.topology.noiommu(n)) for n in self.topology.groups()}
        # Each driver's device joins its IOMMU group as it is made (VfioDevice.__init__).
        self.vfio_devices = {d.bdf: VfioPciDevice(self, self.functions[d.bdf], d) for d in self.topology.devices}
        self.platform_devices = {d.name: BUS_DRIVERS[d.bus](self, models[d.name], d) for d in self.topology.platform}
        self.ccw_devices = {d.schid: VfioCcwDevice(self, d, _devices.CATALOG[d.model]()) for d in self.topology.ccw}
        self._mappings: list[weakref.ref] = []
        self.iommu_fault_log: list[IOMMUFault] = []
        self._lock = threading.RLock()
        self._worker: Worker | None = None
        self.faults = Faults(self)
        for fn in self.functions.values():
            fn.start(self.watch)

    # -- Host: files --------------------------------------------------------------------------
    def fd_install(self, f: File) -> int:
        self.files[f.fd] = f
        return f.fd

    def locked(self, fn: Callable, *args):
        """fn(*args) under the kernel lock, taken by hand: on 3.11 a `with` costs two to three
        times as much, and every test's syscalls come through here."""
        lock = self._lock
        lock.acquire()
        try:
            return fn(*args)
        finally:
            lock.release()

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        with self._lock:
            if not self._os.path.exists(path):
                raise error(errno.ENOENT, path)
            if path == "/dev/vfio/vfio":
                return self.fd_install(ContainerFile(self))
            m = _GROUP_RE.match(path)
            if not m:
                raise error(errno.ENXIO, f"{path} is not a device the fake kernel drives")
            group = self.groups[int(m.group(1))]
            if group.opened is not None:
                raise error(errno.EBUSY, f"group {group.number} is already open")
            f = GroupFile(self, group)
            group.opened = f
            return self.fd_install(f)

    def close(self, fd: int) -> None:
        with self._lock:
            f = self.files.pop(fd, None)
            if f is None:
                os.close(fd)
                return
            os.close(f.fd)
            f.release()

    def _file(self, fd: int) -> File:
        f = self.files.get(fd)
        if f is None:
            raise _not_vfio(fd)
        return f

    def ioctl(self, fd: int, request: int, arg: int | bytearray | bytes = 0) -> int:
        """Immutable bytes go in as a copy, as RealHost passes them: the answer is not seen."""
        if isinstance(arg, bytes):
            arg = bytearray(arg)
        f = self.files.get(fd)
        if f is None:
            raise _not_vfio(fd)
        handler = f.lockless.get(request)
        if handler is not None:
            return handler(f, arg)
        return self.locked(f.ioctl, request, arg)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """A negative offset is EINVAL before any driver sees it (rw_verify_area)."""
        f = self.files.get(fd)
        if f is None:
            return os.pread(fd, n, offset)
        if not isinstance(f, DeviceFile) or offset < 0:
            raise error(errno.EINVAL, f"read on a {f.kind} at {offset}")
        if n == 0:
            return b""
        return self.locked(f.device.rw, offset, None, n)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        f = self.files.get(fd)
        if f is None:
            return os.pwrite(fd, data, offset)
        if not isinstance(f, DeviceFile) or offset < 0:
            raise error(errno.EINVAL, f"write on a {f.kind} at {offset}")
        if not data:
            return 0
        return self.locked(f.device.rw, offset, bytes(data), len(data))

    def mmap(self, fd: int, length: int, offset: int, prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE):
        with self._lock:
            f = self._file(fd)
            if not isinstance(f, DeviceFile):
                raise error(errno.ENODEV if isinstance(f, GroupFile) else errno.EINVAL, f"mmap of a {f.kind}")
            if offset % PAGE_SIZE:
                raise error(errno.EINVAL, "mmap offset not page aligned")
            m = f.device.mmap(offset, length, prot)
            self._mappings.append(weakref.ref(m))
            return m

    def live_mappings(self) -> int:
        """mmaps handed out and not yet closed: leaks show up here."""
        self._mappings = [r for r in self._mappings if r() is not None and not r().closed]
        return len(self._mappings)

    # -- Host: sysfs --------------------------------------------------------------------------
    def readlink(self, path: str) -> str:
        return self._os.readlink(path)

    def exists(self, path: str) -> bool:
        return self._os.path.exists(path)

    def stat(self, path: str) -> os.stat_result:
        return self._os.stat(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(self._os.listdir(path))

    def read_text(self, path: str) -> str:
        with self._open(path) as f:
            return f.read()

    def write_text(self, path: str, text: str) -> None:
        with self._lock:
            if not self._os.path.exists(path):
                raise error(errno.ENOENT, path)
            if path.endswith("/driver_override"):
                with self._open(path, "w") as f:
                    f.write(text.strip() + "\n" if text.strip() else "(null)\n")
                return
            m = re.match(r"^/sys/bus/pci/drivers/([^/]+)/(bind|unbind)$", path)
            if not m:
                raise error(errno.EACCES, f"{path} is read-only in the fake sysfs")
            spec = self._spec(text.strip())
            if m.group(2) == "unbind":
                if spec.driver != m.group(1):
                    raise error(errno.ENODEV, f"{spec.bdf} is not bound to {m.group(1)}")
                self._unbind(spec)
            else:
                if spec.driver:
                    raise error(errno.EBUSY, f"{spec.bdf} is bound to {spec.driver}")
                self.sysfs.set_driver(spec, m.group(1))

    def _spec(self, bdf: str) -> PciDeviceSpec:
        spec = next((d for d in self.topology.devices if d.bdf == bdf), None)
        if spec is None:
            raise error(errno.ENODEV, f"no PCI device {bdf}")
        return spec

    def _unbind(self, spec: PciDeviceSpec) -> None:
        group = self.groups.get(spec.group)
        if spec.driver == "vfio-pci" and group and group.device_fds and self.vfio_devices[spec.bdf].open_count:
            raise error(errno.EBUSY, f"{spec.bdf} is in use through VFIO")
        self.sysfs.set_driver(spec, None)

    # -- what tests look into, and what the drivers ask of the kernel ---------------------------
    def platform_device(self, name: str) -> VfioPlatformDevice:
        """The vfio-platform state of a device (its model is `.model`), for tests to look into."""
        return self.platform_devices[name]

    def ccw_device(self, schid: str) -> VfioCcwDevice:
        """The vfio_ccw state of a subchannel (its hardware is `.subchannel`), for tests."""
        return self.ccw_devices[schid]

    def watch(self, fd: int, callback: Callable[[], None] | None) -> None:
        """The kernel's worker runs `callback` under the kernel lock whenever `fd` is readable
        (None stops watching); virqfds and devices that serve a socket or eventfds use it."""
        if self._worker is None:
            if callback is None:
                return
            self._worker = Worker(self._lock)
        self._worker.watch(fd, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """The kernel's worker runs `callback` under the kernel lock `delay` seconds from now,
        unless the Timer is cancelled first: a device model's QEMU timer (timer_mod, timer_del)."""
        if self._worker is None:
            self._worker = Worker(self._lock)
        return self._worker.call_later(delay, callback)

    def watched(self) -> int:
        """fds the kernel's worker watches (virqfds, device sockets and eventfds)."""
        return self._worker.watched() if self._worker else 0

    def iommu_faults(self) -> list[IOMMUFault]:
        """Every DMA a type1 IOMMU of this kernel refused, oldest first, kept after its container
        is gone: what Linux's DMAR fault lines in dmesg tell. Each was also a WARNING on the
        `fakekernel.iommu` logger."""
        return list(self.iommu_fault_log)

    def open_files(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.files.values():
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    def close_all(self) -> None:
        """Close every fake fd (devices first), stop the worker thread and free BAR memory."""
        self.faults.clear()
        with self._lock:
            for kind in (DeviceFile, GroupFile, ContainerFile):
                for fd in [fd for fd, f in self.files.items() if isinstance(f, kind)]:
                    self.close(fd)
            for dev in (*self.vfio_devices.values(), *self.platform_devices.values(), *self.ccw_devices.values()):
                dev.release()
            for fn in self.functions.values():
                fn.stop()
        if self._worker:
            self._worker.stop()
            self._worker = None

    def __enter__(self) -> "FakeKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()
