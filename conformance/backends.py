"""Backends the suite runs on, and what devices each offers."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from vfio_impl import uapi
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.host import Host, RealHost
from vfio_impl.core.iommu import iommu_group
from vfio_impl.core.pciaddr import PCI_DEVICES, sysfs_path

# vendor:device -> the catalog name tests ask for.
MODELS = {(0x1234, 0x11E8): "edu", (0x1AF4, 0x1110): "ivshmem", (0x8086, 0x10D3): "e1000e"}
# Drivers that leave a group viable: vfio's own, pci-stub, and those that do no DMA (Linux's
# driver_managed_dma), which is why a PCIe root port bound to pcieport may share a group.
VIABLE_DRIVERS = ("vfio-pci", "pci-stub", "pcieport")


@dataclass(slots=True)
class DeviceInfo:
    bdf: str
    sysfs: str
    vendor: int
    device: int
    model: str
    group: int | None
    driver: str | None

    @property
    def label(self) -> str:
        return f"{self.bdf} {self.vendor:04x}:{self.device:04x} ({self.model})"


@dataclass
class Backend:
    kind: str
    host: Host
    kernel: str
    devices: list[DeviceInfo] = field(default_factory=list)
    destructive: bool = False
    used: list[str] = field(default_factory=list)
    profile: object = None   # fakekernel.profile.Profile: where a test's expected answers differ by version

    def find(self, model: str) -> DeviceInfo | None:
        """The first device of a model; what a test finds is what it ran on, for the report."""
        found = next((d for d in self.devices if d.model == model), None)
        if found and found.bdf not in self.used:
            self.used.append(found.bdf)
        return found


def describe(host: Host, bdf_or_path: str) -> DeviceInfo:
    sysfs = sysfs_path(bdf_or_path)
    bdf = os.path.basename(sysfs)
    vendor = int(host.read_text(f"{sysfs}/vendor"), 16)
    device = int(host.read_text(f"{sysfs}/device"), 16)
    try:
        group = iommu_group(host, sysfs)
    except VFIOError:
        group = None
    driver = driver_of(host, sysfs)
    model = MODELS.get((vendor, device), "unknown")
    if model == "ivshmem" and _resource_size(host, sysfs, 1):
        model = "ivshmem-doorbell"
    return DeviceInfo(bdf, sysfs, vendor, device, model, group, driver)


def driver_of(host: Host, sysfs: str) -> str | None:
    try:
        return host.readlink(f"{sysfs}/driver").rsplit("/", 1)[-1]
    except OSError:
        return None


class DeviceError(Exception):
    """A device named on the command line that no test can run on; the message says why and
    what to do, in one line."""


def check_device(host: Host, name: str) -> DeviceInfo:
    """What a named device must be before any test runs: present, bound to vfio-pci, and in a
    viable group. The group's viability is the kernel's own answer (GROUP_GET_STATUS)."""
    try:
        sysfs = sysfs_path(name)
    except ValueError as e:
        raise DeviceError(f"--device {name}: {e}, nor a sysfs path") from None
    if not host.exists(sysfs):
        raise DeviceError(f"--device {name}: no such device: {sysfs} does not exist")
    info = describe(host, sysfs)
    if info.driver != "vfio-pci":
        bound = f"bound to {info.driver}" if info.driver else "bound to no driver"
        raise DeviceError(f"--device {name}: {info.bdf} is {bound}, not vfio-pci; bind it with "
                          f"'echo vfio-pci > {sysfs}/driver_override' and "
                          f"'echo {info.bdf} > /sys/bus/pci/drivers_probe' (after unbinding it)")
    if info.group is None:
        raise DeviceError(f"--device {name}: {info.bdf} has no IOMMU group (is the IOMMU on?)")
    _check_viable(host, info)
    return info


def _check_viable(host: Host, info: DeviceInfo) -> None:
    path = f"/dev/vfio/{info.group}"
    try:
        fd = host.open(path, os.O_RDWR)
    except OSError as e:
        hint = "; another process has the group open" if e.errno == errno.EBUSY else ""
        raise DeviceError(f"--device {info.bdf}: cannot open {path}: {e.strerror}{hint}") from None
    try:
        status = uapi.vfio_group_status.pack()
        host.ioctl(fd, uapi.VFIO_GROUP_GET_STATUS, status)
        viable = uapi.vfio_group_status.unpack(status).flags & uapi.VFIO_GROUP_FLAGS_VIABLE
    finally:
        host.close(fd)
    if viable:
        return
    members = host.listdir(f"/sys/kernel/iommu_groups/{info.group}/devices")
    culprits = [f"{m} (bound to {d})" for m in sorted(members)
                if (d := driver_of(host, f"{PCI_DEVICES}/{m}")) and d not in VIABLE_DRIVERS]
    raise DeviceError(f"--device {info.bdf}: IOMMU group {info.group} is not viable: "
                      f"{', '.join(culprits) or 'a member'} must be bound to vfio-pci or unbound")


def _resource_size(host: Host, sysfs: str, index: int) -> int:
    """BAR `index`'s size from sysfs `resource`: ivshmem-plain and ivshmem-doorbell share their
    ids, and only the doorbell has BAR1, its MSI-X table."""
    try:
        start, end, _ = host.read_text(f"{sysfs}/resource").splitlines()[index].split()
    except (OSError, IndexError, ValueError):
        return 0
    return int(end, 16) - int(start, 16) + 1 if int(end, 16) else 0


def vfio_bound(host: Host) -> list[DeviceInfo]:
    """Every PCI device bound to vfio-pci: what a real backend offers when no device is named."""
    if not host.exists(PCI_DEVICES):
        return []
    found = [describe(host, bdf) for bdf in host.listdir(PCI_DEVICES)]
    return [d for d in found if d.driver == "vfio-pci"]


REAL_MISSING = "real backend: /dev/vfio/vfio is absent, this kernel has no VFIO (load vfio-pci or use the ci/ VM runner)"


def check_named(kind: str, names: list[str]) -> list[DeviceInfo]:
    """The devices named for a run, each checked as `check_device` does, on this machine or on
    the fake's default topology (the machine the fake mirrors)."""
    if kind == "real":
        if not real_available():
            raise DeviceError(REAL_MISSING)
        host = RealHost()
        return [check_device(host, name) for name in names]
    from fakekernel.topology import DEFAULT_TOPOLOGY

    with fake_kernel() as kernel:
        try:
            return [check_device(kernel, name) for name in names]
        except DeviceError as e:
            raise DeviceError(f"{e} (on the fake's {DEFAULT_TOPOLOGY!r} topology)") from None


@contextmanager
def fake_kernel(topology: str | None = None, profile=None):
    """A FakeKernel on a named topology (the default one when None) modelling `profile`, with an
    ivshmem server for each doorbell that names none, as the CI VM's host starts one before QEMU;
    the kernel closes first, then the servers."""
    from fakekernel import FakeKernel, Topology
    from fakekernel.topology import DEFAULT_TOPOLOGY
    from vfio_impl.ivshmem.server import doorbell_servers

    with doorbell_servers(Topology.named(topology or DEFAULT_TOPOLOGY)) as served, \
            FakeKernel(served, profile) as kernel:
        yield kernel


def kernel_profile(kind: str, name: str | None = None):
    """The kernel profile a run holds its tests to: the fake's, by name (its default when None),
    or the one that models the running kernel on real (None if no profile models it)."""
    from fakekernel.profile import DEFAULT_PROFILE, Profile

    if kind == "real":
        return Profile.modelling(os.uname().release)
    return Profile.named(name or DEFAULT_PROFILE)


def kernel_label(kind: str, profile: str | None = None) -> str:
    """The kernel a run tests, as reports and JUnit suite names show it."""
    if kind == "real":
        return os.uname().release
    return f"fake {kernel_profile(kind, profile).name}"


def real_backend(devices: list[str], destructive: bool) -> Backend:
    host = RealHost()
    found = [check_device(host, d) for d in devices] if devices else vfio_bound(host)
    return Backend("real", host, os.uname().release, found, destructive, profile=kernel_profile("real"))


def real_available() -> bool:
    return os.path.exists("/dev/vfio/vfio")
