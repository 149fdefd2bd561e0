"""Backends the suite runs on, and what devices each offers."""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from vfio_impl import uapi
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.host import Host, RealHost
from vfio_impl.core.iommu import iommu_group
from vfio_impl.core.pciaddr import PCI_DEVICES, sysfs_path
from vfio_impl.flavours.ccw import realpath
from vfio_impl.flavours.platform import AMBA_DEVICES, PLATFORM_DEVICES

# vendor:device -> the catalog name tests ask for.
MODELS = {(0x1234, 0x11E8): "edu", (0x1AF4, 0x1110): "ivshmem", (0x8086, 0x10D3): "e1000e"}
# A platform or AMBA device's first of_node compatible entry -> its catalog name.
PLATFORM_MODELS = {"arm,pl031": "pl031", "arm,pl061": "pl061", "virtio,mmio": "virtio-mmio",
                   "qemu,platform-test": "platform-test"}
# Where each bus lists its devices, and the VFIO driver a device of that bus is bound to. A
# vfio-ccw device is the mdev vfio_ccw's mdev driver drives, created on an I/O subchannel bound to
# vfio_ccw; it is listed with the other mdevs.
MDEV_DEVICES = "/sys/bus/mdev/devices"
BUS_DEVICES = {"pci": PCI_DEVICES, "platform": PLATFORM_DEVICES, "amba": AMBA_DEVICES, "ccw": MDEV_DEVICES}
VFIO_DRIVERS = {"pci": "vfio-pci", "platform": "vfio-platform", "amba": "vfio-amba", "ccw": "vfio_ccw_mdev"}
_UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)
# Drivers that leave a group viable: vfio's own, pci-stub, and those that do no DMA (Linux's
# driver_managed_dma), which is why a PCIe root port bound to pcieport may share a group.
VIABLE_DRIVERS = (*VFIO_DRIVERS.values(), "pci-stub", "pcieport")


@dataclass(slots=True)
class DeviceInfo:
    """`bdf` is the kernel's name for the device: a PCI address, a platform or AMBA device's name
    (9010000.pl031), or a vfio-ccw mdev's UUID, whose `model` is its mdev type (what is behind
    the subchannel only SENSE ID tells: conformance.ccw_models). `noiommu`: its group is a
    no-IOMMU one, /dev/vfio/noiommu-N."""

    bdf: str
    sysfs: str
    vendor: int
    device: int
    model: str
    group: int | None
    driver: str | None
    bus: str = "pci"
    noiommu: bool = False

    @property
    def label(self) -> str:
        if self.bus != "pci":
            return f"{self.bdf} {self.bus} ({self.model})"
        return f"{self.bdf} {self.vendor:04x}:{self.device:04x} ({self.model})"

    @property
    def group_path(self) -> str:
        return f"/dev/vfio/{'noiommu-' if self.noiommu else ''}{self.group}"


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
        if found:
            self.use(found)
        return found

    def use(self, device: DeviceInfo) -> None:
        """Records that the test ran on `device`, for the report."""
        if device.bdf not in self.used:
            self.used.append(device.bdf)


def device_sysfs(host: Host, name: str) -> str:
    """A device's sysfs directory from a sysfs path, a PCI address, a platform or AMBA device
    name or an mdev's UUID; ValueError for a name that is none of them."""
    try:
        return sysfs_path(name)
    except ValueError:
        pass
    found = [f"{BUS_DEVICES[bus]}/{name}" for bus in ("platform", "amba", "ccw")
             if "/" not in name and host.exists(f"{BUS_DEVICES[bus]}/{name}")]
    if not found:
        raise ValueError(f"{name!r} is not a PCI address (DDDD:BB:SS.F or BB:SS.F), nor a device under "
                         f"{PLATFORM_DEVICES}, {AMBA_DEVICES} or {MDEV_DEVICES}")
    return found[0]


def device_exists(host: Host, name: str) -> bool:
    try:
        return host.exists(device_sysfs(host, name))
    except ValueError:
        return False


def device_name(name: str) -> str:
    """The kernel's name of a device named on the command line, as reports list it."""
    try:
        return os.path.basename(sysfs_path(name))
    except ValueError:
        return name


def bus_of(host: Host, sysfs: str) -> str:
    """The bus a device is on, from where its path lies or else its subsystem link; an mdev
    counts as ccw when its subchannel parent is (vfio_ccw's mdev type says vfio-ccw)."""
    bus = next((bus for bus, devices in BUS_DEVICES.items() if sysfs.startswith(devices + "/")), None)
    if bus is None and _mdev_api(host, sysfs) == "vfio-ccw":
        bus = "ccw"
    if bus is None:
        try:
            bus = host.readlink(f"{sysfs}/subsystem").rsplit("/", 1)[-1]
        except OSError:
            bus = "pci"
    return bus if bus in BUS_DEVICES else "pci"


def describe(host: Host, name_or_path: str) -> DeviceInfo:
    sysfs = device_sysfs(host, name_or_path)
    bus = bus_of(host, sysfs)
    try:
        group = iommu_group(host, sysfs)
    except VFIOError:
        group = None
    driver = driver_of(host, sysfs)
    noiommu = group is not None and host.exists(f"/dev/vfio/noiommu-{group}")
    if bus == "ccw":
        return DeviceInfo(os.path.basename(sysfs), sysfs, 0, 0, _mdev_type(host, sysfs), group, driver, bus)
    if bus != "pci":
        compatible = _compatible(host, sysfs)
        model = PLATFORM_MODELS.get(compatible[0], "unknown") if compatible else "unknown"
        return DeviceInfo(os.path.basename(sysfs), sysfs, 0, 0, model, group, driver, bus, noiommu)
    vendor = int(host.read_text(f"{sysfs}/vendor"), 16)
    device = int(host.read_text(f"{sysfs}/device"), 16)
    model = MODELS.get((vendor, device), "unknown")
    if model == "ivshmem" and _resource_size(host, sysfs, 1):
        model = "ivshmem-doorbell"
    return DeviceInfo(os.path.basename(sysfs), sysfs, vendor, device, model, group, driver, bus, noiommu)


def _compatible(host: Host, sysfs: str) -> list[str]:
    """The of_node's compatible list, most specific first; empty for a device with no of_node."""
    try:
        return [c for c in host.read_text(f"{sysfs}/of_node/compatible").split("\0") if c]
    except OSError:
        return []


def _mdev_type(host: Host, sysfs: str) -> str:
    return _link_name(host, f"{sysfs}/mdev_type") or "unknown"


def _mdev_api(host: Host, sysfs: str) -> str | None:
    try:
        return host.read_text(f"{sysfs}/mdev_type/device_api").strip()
    except OSError:
        return None


def subchannel_of(host: Host, sysfs: str) -> str:
    """The directory of the I/O subchannel a vfio-ccw mdev was created on: its parent."""
    return os.path.dirname(realpath(host, sysfs))


def driver_of(host: Host, sysfs: str) -> str | None:
    return _link_name(host, f"{sysfs}/driver")


def _link_name(host: Host, link: str) -> str | None:
    """The last component of a sysfs link's target (a driver, an mdev type); None if there is none."""
    try:
        return host.readlink(link).rsplit("/", 1)[-1]
    except OSError:
        return None


class DeviceError(Exception):
    """A device named on the command line that no test can run on; the message says why and
    what to do, in one line."""


def check_device(host: Host, name: str) -> DeviceInfo:
    """What a named device must be before any test runs: present, bound to its bus's VFIO driver
    (vfio-pci, vfio-platform, vfio-amba), and in a viable group. The group's viability is the
    kernel's own answer (GROUP_GET_STATUS)."""
    try:
        sysfs = device_sysfs(host, name)
    except ValueError as e:
        raise DeviceError(f"--device {name}: {e}, nor a sysfs path") from None
    if not host.exists(sysfs):
        raise DeviceError(f"--device {name}: no such device: {sysfs} does not exist")
    if host.exists(f"{sysfs}/pimpampom"):
        mdevs = [m for m in host.listdir(sysfs) if _UUID.fullmatch(m)]
        raise DeviceError(f"--device {name}: an I/O subchannel, which VFIO does not open; name the vfio-ccw mdev "
                          f"created on it ({', '.join(f'{MDEV_DEVICES}/{m}' for m in mdevs) or 'none yet'})")
    info = describe(host, sysfs)
    if info.bus == "ccw":
        _check_subchannel(host, name, info)
    want = VFIO_DRIVERS[info.bus]
    if info.driver != want:
        bound = f"bound to {info.driver}" if info.driver else "bound to no driver"
        probe = f"/sys/bus/{info.bus}/drivers_probe"
        raise DeviceError(f"--device {name}: {info.bdf} is {bound}, not {want}; bind it with "
                          f"'echo {want} > {sysfs}/driver_override' and "
                          f"'echo {info.bdf} > {probe}' (after unbinding it)")
    if info.group is None:
        raise DeviceError(f"--device {name}: {info.bdf} has no IOMMU group (is the IOMMU on, or "
                          "vfio loaded with enable_unsafe_noiommu_mode=1?)")
    _check_viable(host, info)
    return info


def _check_subchannel(host: Host, name: str, info: DeviceInfo) -> None:
    """A vfio-ccw mdev's subchannel must be bound to vfio_ccw, which alone makes such mdevs."""
    sch = subchannel_of(host, info.sysfs)
    driver = driver_of(host, sch)
    if driver != "vfio_ccw":
        schid = os.path.basename(sch)
        raise DeviceError(f"--device {name}: {info.bdf} is not an mdev of an I/O subchannel bound to vfio_ccw "
                          f"({schid} is bound to {driver or 'no driver'}); bind the subchannel with "
                          f"'echo vfio_ccw > /sys/bus/css/devices/{schid}/driver_override' and "
                          f"'echo {schid} > /sys/bus/css/drivers/vfio_ccw/bind', then write a UUID to its "
                          "mdev_supported_types/vfio_ccw-io/create")


def _check_viable(host: Host, info: DeviceInfo) -> None:
    path = info.group_path
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
    devices = BUS_DEVICES[info.bus]
    culprits = [f"{m} (bound to {d})" for m in sorted(members)
                if (d := driver_of(host, f"{devices}/{m}")) and d not in VIABLE_DRIVERS]
    raise DeviceError(f"--device {info.bdf}: IOMMU group {info.group} is not viable: "
                      f"{', '.join(culprits) or 'a member'} must be bound to {VFIO_DRIVERS[info.bus]} or unbound")


def _resource_size(host: Host, sysfs: str, index: int) -> int:
    """BAR `index`'s size from sysfs `resource`: ivshmem-plain and ivshmem-doorbell share their
    ids, and only the doorbell has BAR1, its MSI-X table."""
    try:
        start, end, _ = host.read_text(f"{sysfs}/resource").splitlines()[index].split()
    except (OSError, IndexError, ValueError):
        return 0
    return int(end, 16) - int(start, 16) + 1 if int(end, 16) else 0


def vfio_bound(host: Host) -> list[DeviceInfo]:
    """Every device bound to its bus's VFIO driver: what a real backend offers when no device is
    named."""
    found = []
    for bus, devices in BUS_DEVICES.items():
        if host.exists(devices):
            found += [d for name in host.listdir(devices)
                      if driver_of(host, f"{devices}/{name}") == VFIO_DRIVERS[bus]
                      for d in [describe(host, f"{devices}/{name}")]]
    return found


REAL_MISSING = "real backend: /dev/vfio/vfio is absent, this kernel has no VFIO (load vfio-pci or use the ci/ VM runner)"


def check_named(kind: str, names: list[str]) -> list[DeviceInfo]:
    """The devices named for a run, each checked as `check_device` does, on this machine or on
    the fake's default topology (the machine the fake mirrors)."""
    if kind == "real":
        if not real_available():
            raise DeviceError(REAL_MISSING)
        host = RealHost()
        return [check_device(host, name) for name in names]
    return [_check_on_fake(name) for name in names]


def is_ccw_name(name: str) -> bool:
    """A vfio-ccw mdev's name on a command line: its UUID, or a path among mdevs or subchannels."""
    return bool(_UUID.fullmatch(name)) or name.startswith((MDEV_DEVICES, "/sys/bus/css/", "/sys/devices/css"))


def _check_on_fake(name: str) -> DeviceInfo:
    """A name is checked on the fake topology that mirrors a CI guest with such a device: the
    x86 VM's for PCI devices, the arm64 guest's for platform and AMBA ones, the s390x guest's for
    vfio-ccw mdevs."""
    from fakekernel.topology import DEFAULT_TOPOLOGY

    try:
        pci = not sysfs_path(name).startswith((PLATFORM_DEVICES, AMBA_DEVICES))
    except ValueError:
        pci = False
    topology = "ccw" if is_ccw_name(name) else DEFAULT_TOPOLOGY if pci else "platform"
    with fake_kernel(topology) as kernel:
        try:
            return check_device(kernel, name)
        except DeviceError as e:
            raise DeviceError(f"{e} (on the fake's {topology!r} topology)") from None


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
