"""Backends the suite runs on, and what devices each offers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vfio_impl.host import Host, RealHost

# vendor:device -> the catalog name tests ask for.
MODELS = {(0x1234, 0x11E8): "edu", (0x1AF4, 0x1110): "ivshmem", (0x8086, 0x10D3): "e1000e"}
PCI_DEVICES = "/sys/bus/pci/devices"


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

    def find(self, model: str) -> DeviceInfo | None:
        return next((d for d in self.devices if d.model == model), None)


def describe(host: Host, bdf_or_path: str) -> DeviceInfo:
    sysfs = bdf_or_path if bdf_or_path.startswith("/") else f"{PCI_DEVICES}/{bdf_or_path}"
    sysfs = sysfs.rstrip("/")
    bdf = os.path.basename(sysfs)
    vendor = int(host.read_text(f"{sysfs}/vendor"), 16)
    device = int(host.read_text(f"{sysfs}/device"), 16)
    try:
        group = int(host.readlink(f"{sysfs}/iommu_group").rsplit("/", 1)[-1])
    except (OSError, ValueError):
        group = None
    try:
        driver = host.readlink(f"{sysfs}/driver").rsplit("/", 1)[-1]
    except OSError:
        driver = None
    model = MODELS.get((vendor, device), "unknown")
    if model == "ivshmem" and _resource_size(host, sysfs, 1):
        model = "ivshmem-doorbell"
    return DeviceInfo(bdf, sysfs, vendor, device, model, group, driver)


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


def real_backend(devices: list[str], destructive: bool) -> Backend:
    host = RealHost()
    found = [describe(host, d) for d in devices] if devices else vfio_bound(host)
    return Backend("real", host, os.uname().release, found, destructive)


def real_available() -> bool:
    return os.path.exists("/dev/vfio/vfio")
