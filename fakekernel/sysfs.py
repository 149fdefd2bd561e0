"""The sysfs tree and /dev/vfio of the fake kernel, in a pyfakefs filesystem."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyfakefs.fake_filesystem import FakeFilesystem

from .pci import BAR_IO, BAR_MEM64, PciFunction
from .topology import CcwDeviceSpec, PciDeviceSpec, PlatformDeviceSpec, Topology, VIABLE_DRIVERS, VFIO_DRIVERS

if TYPE_CHECKING:
    from .devices.platform_test import PlatformDevice

PCI_DEVICES = "/sys/bus/pci/devices"
PLATFORM_DEVICES = "/sys/bus/platform/devices"
IOMMU_GROUPS = "/sys/kernel/iommu_groups"
# vfio's module parameter, and vfio-platform's, which the arm64 runner loads with 0 so that
# devices with no reset function can be bound.
NOIOMMU_MODE = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
RESET_REQUIRED = "/sys/module/vfio_platform/parameters/reset_required"
# The name vfio_noiommu_group_alloc gives the IOMMU groups it makes.
NOIOMMU_GROUP_NAME = "vfio-noiommu"
DEVICETREE = "/sys/firmware/devicetree/base"
CSS_DEVICES = "/sys/bus/css/devices"
MDEV_DEVICES = "/sys/bus/mdev/devices"
CSS0 = "/sys/devices/css0"
# The one mdev type vfio_ccw offers on an I/O subchannel.
MDEV_TYPE = "vfio_ccw-io"


def device_dir(bdf: str) -> str:
    return f"/sys/devices/pci{bdf[:7]}/{bdf}"


def platform_dir(name: str) -> str:
    """A devicetree device's directory, on the platform bus or the AMBA bus alike: of_platform
    makes both children of the platform bus's root device."""
    return f"/sys/devices/platform/{name}"


def group_node(group: int, noiommu: bool) -> str:
    """The group's character device: vfio_create_group names a no-IOMMU one noiommu-N."""
    return f"/dev/vfio/{'noiommu-' if noiommu else ''}{group}"


def of_node_name(name: str) -> str:
    """c0000000.platform-test is the devicetree node platform-test@c0000000."""
    addr, _, node = name.partition(".")
    return f"{node}@{addr}"


# IORESOURCE_* bits of include/linux/ioport.h that `resource` shows beside the BAR's own low bits.
IORESOURCE_IO, IORESOURCE_MEM, IORESOURCE_PREFETCH = 0x100, 0x200, 0x2000
IORESOURCE_SIZEALIGN, IORESOURCE_MEM_64 = 0x40000, 0x100000
PCI_NUM_RESOURCES_SHOWN = 13  # six BARs, the ROM and the six SR-IOV BARs


def _resource(fn: PciFunction) -> str:
    """One `start end flags` line per resource, as pci's resource_show prints them; a tool tells
    the ivshmem variants apart by whether BAR1 (the doorbell's MSI-X) has a size."""
    lines = []
    for index in range(PCI_NUM_RESOURCES_SHOWN):
        bar = fn.bars[index] if index < len(fn.bars) else None
        if bar is None:
            lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
            continue
        start = fn.bar_address(index)
        flags = (IORESOURCE_SIZEALIGN | bar.flags | (IORESOURCE_IO if bar.kind == BAR_IO else IORESOURCE_MEM)
                 | (IORESOURCE_PREFETCH if bar.prefetch else 0) | (IORESOURCE_MEM_64 if bar.kind == BAR_MEM64 else 0))
        lines.append(f"0x{start:016x} 0x{start + bar.size - 1:016x} 0x{flags:016x}")
    return "\n".join(lines) + "\n"


class Sysfs:
    """Builds and updates the tree as devices are bound and unbound."""

    def __init__(self, topology: Topology, functions: dict[str, PciFunction], platform: dict[str, "PlatformDevice"]):
        self.fs = FakeFilesystem(path_separator="/")
        self.topology = topology
        self.fs.create_file("/dev/vfio/vfio")
        for path in (PCI_DEVICES, PLATFORM_DEVICES, CSS_DEVICES, MDEV_DEVICES):
            self.fs.create_dir(path)
        if topology.enable_unsafe_noiommu_mode:
            self.fs.create_file(NOIOMMU_MODE, contents="Y\n")
        if topology.platform:
            self.fs.create_file(RESET_REQUIRED, contents="N\n")
        for spec in topology.devices:
            self._add_device(spec, functions[spec.bdf])
        for spec in topology.platform:
            self._add_platform_device(spec, platform[spec.name])
        for spec in topology.ccw:
            self._add_ccw_device(spec)
        for group in topology.groups():
            self.sync_group(group)

    def _add_device(self, spec: PciDeviceSpec, fn: PciFunction) -> None:
        fs, path = self.fs, device_dir(spec.bdf)
        for name, value in (("vendor", f"0x{fn.vendor_id:04x}"), ("device", f"0x{fn.device_id:04x}"),
                            ("class", f"0x{fn.class_code:06x}"), ("revision", f"0x{fn.revision:02x}"),
                            ("subsystem_vendor", f"0x{fn.subsystem_vendor_id:04x}"),
                            ("subsystem_device", f"0x{fn.subsystem_id:04x}"),
                            ("driver_override", "(null)")):
            fs.create_file(f"{path}/{name}", contents=value + "\n")
        fs.create_file(f"{path}/resource", contents=_resource(fn))
        fs.create_symlink(f"{PCI_DEVICES}/{spec.bdf}", f"../../../devices/pci{spec.bdf[:7]}/{spec.bdf}")
        self._add_to_group(path, spec.bdf, spec.group, None)
        self.set_driver(spec, spec.driver)

    def _add_to_group(self, path: str, name: str, group: int | None, link: str | None) -> None:
        """The device's iommu_group link and its entry in the group's devices directory; a
        no-IOMMU group also has a name."""
        fs = self.fs
        if group is not None:
            if not fs.exists(f"{IOMMU_GROUPS}/{group}/devices"):
                fs.create_dir(f"{IOMMU_GROUPS}/{group}/devices")
                if self.topology.noiommu(group):
                    fs.create_file(f"{IOMMU_GROUPS}/{group}/name", contents=NOIOMMU_GROUP_NAME + "\n")
            fs.create_symlink(f"{IOMMU_GROUPS}/{group}/devices/{name}", "../../../.." + path[len("/sys"):])
            link = link or f"../../../kernel/iommu_groups/{group}"
        if link:
            fs.create_symlink(f"{path}/iommu_group", link)

    def _add_platform_device(self, spec: PlatformDeviceSpec, model: "PlatformDevice") -> None:
        """A devicetree device: of_node is a link into /sys/firmware/devicetree, whose compatible
        holds each string NUL-terminated. An AMBA device shows the peripheral ID the bus read
        from its ID registers (amba_read_periphid) as `id`."""
        fs, path = self.fs, platform_dir(spec.name)
        fs.create_file(f"{path}/driver_override", contents="(null)\n")
        fs.create_symlink(f"/sys/bus/{spec.bus}/devices/{spec.name}", f"../../../devices/platform/{spec.name}")
        if spec.bus == "amba":
            fs.create_file(f"{path}/id", contents=f"{model.periphid:08x}\n")
        if spec.compatible is not None:
            node_name = of_node_name(spec.name)
            node = f"{DEVICETREE}/{node_name}"
            fs.create_file(f"{node}/compatible", contents="".join(c + "\0" for c in spec.compatible))
            fs.create_file(f"{node}/name", contents=node_name.partition("@")[0] + "\0")
            fs.create_symlink(f"{path}/of_node", f"../../../firmware/devicetree/base/{node_name}")
        self._add_to_group(path, spec.name, spec.group, spec.group_link)
        self.set_driver(spec, spec.driver)

    def _add_ccw_device(self, spec: CcwDeviceSpec) -> None:
        """An I/O subchannel bound to vfio_ccw (through driver_override, as the CI guest binds it),
        its channel paths as cio shows them (chpids, pimpampom, each chp0.XX), and the one mdev of
        type vfio_ccw-io created under it, which is what VFIO opens. The subchannel has no ccw
        device under it any more: io_subchannel unregistered it when it let the subchannel go."""
        fs, sch = self.fs, f"{CSS0}/{spec.schid}"
        fs.create_file(f"{sch}/type", contents="0\n")
        fs.create_file(f"{sch}/modalias", contents="css:t0\n")
        fs.create_file(f"{sch}/driver_override", contents="vfio_ccw\n")
        fs.create_file(f"{sch}/dev_busid", contents=f"0.{spec.schid.split('.')[1]}.{spec.devno:04x}\n")
        if spec.chpids is not None:
            ids = list(spec.chpids) + [0] * (8 - len(spec.chpids))
            fs.create_file(f"{sch}/chpids", contents="".join(f"{c:02x} " for c in ids) + "\n")
            for chpid in spec.chpids:
                if not fs.exists(f"{CSS0}/chp0.{chpid:02x}/type"):
                    fs.create_file(f"{CSS0}/chp0.{chpid:02x}/type", contents=f"{spec.chp_type:x}\n")
        pim = path_mask(spec.chpids or ())
        fs.create_file(f"{sch}/pimpampom", contents=f"{pim:02x} {pim:02x} ff\n")
        fs.create_symlink(f"{sch}/driver", "../../../bus/css/drivers/vfio_ccw")
        fs.create_symlink(f"{CSS_DEVICES}/{spec.schid}", f"../../../devices/css0/{spec.schid}")
        mdev_type = f"{sch}/mdev_supported_types/{MDEV_TYPE}"
        for name, value in (("name", "I/O subchannel (Non-QDIO)"), ("device_api", "vfio-ccw"),
                            ("available_instances", "0")):
            fs.create_file(f"{mdev_type}/{name}", contents=value + "\n")
        fs.create_symlink(f"{mdev_type}/devices/{spec.uuid}", f"../../../{spec.uuid}")
        mdev = f"{sch}/{spec.uuid}"
        fs.create_file(f"{mdev}/uevent", contents=f"MDEV_TYPE={MDEV_TYPE}\n")
        fs.create_symlink(f"{mdev}/mdev_type", f"../mdev_supported_types/{MDEV_TYPE}")
        fs.create_symlink(f"{MDEV_DEVICES}/{spec.uuid}", f"../../../devices/css0/{spec.schid}/{spec.uuid}")
        if spec.driver:
            fs.create_symlink(f"{mdev}/driver", f"../../../../bus/mdev/drivers/{spec.driver}")
        link = spec.group_link or (f"../../../../kernel/iommu_groups/{spec.group}" if spec.group is not None else None)
        self._add_to_group(mdev, spec.uuid, spec.group, link)

    def set_driver(self, spec: PciDeviceSpec | PlatformDeviceSpec, driver: str | None) -> None:
        fs = self.fs
        if isinstance(spec, PlatformDeviceSpec):
            bus, name, path, files = spec.bus, spec.name, platform_dir(spec.name), ("bind", "unbind")
        else:
            bus, name, path, files = "pci", spec.bdf, device_dir(spec.bdf), ("bind", "unbind", "new_id", "remove_id")
        drivers, link = f"/sys/bus/{bus}/drivers", f"{path}/driver"
        if fs.exists(link) or fs.islink(link):
            fs.remove_object(link)
            fs.remove_object(f"{drivers}/{spec.driver}/{name}")
        spec.driver = driver
        if driver:
            if not fs.exists(f"{drivers}/{driver}"):
                for file in files:
                    fs.create_file(f"{drivers}/{driver}/{file}")
            fs.create_symlink(link, f"../../../bus/{bus}/drivers/{driver}")
            fs.create_symlink(f"{drivers}/{driver}/{name}", "../../../.." + path[len("/sys"):])
        if spec.group is not None:
            self.sync_group(spec.group)

    def sync_group(self, group: int) -> None:
        """/dev/vfio/N (or noiommu-N) exists while any member is bound to a vfio driver."""
        node = group_node(group, self.topology.noiommu(group))
        present = any(d.driver in VFIO_DRIVERS for d in self._members(group))
        if present and not self.fs.exists(node):
            self.fs.create_file(node)
        elif not present and self.fs.exists(node):
            self.fs.remove_object(node)

    def viable(self, group: int) -> bool:
        return all(d.driver in VIABLE_DRIVERS for d in self._members(group))

    def _members(self, group: int) -> list[PciDeviceSpec | PlatformDeviceSpec]:
        return [*self.topology.group_members(group), *self.topology.platform_members(group),
                *self.topology.ccw_members(group)]


def path_mask(chpids) -> int:
    """One bit per installed channel path, the first path the leftmost bit; a path's chpid may
    be 00, as QEMU's virtio-ccw devices have it."""
    return sum(0x80 >> i for i in range(len(chpids)))
