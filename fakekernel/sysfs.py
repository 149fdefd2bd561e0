"""The sysfs tree and /dev/vfio of the fake kernel, in a pyfakefs filesystem."""

from __future__ import annotations

from pyfakefs.fake_filesystem import FakeFilesystem

from .pci import PciFunction
from .topology import PciDeviceSpec, Topology, VIABLE_DRIVERS, VFIO_DRIVERS

PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"
IOMMU_GROUPS = "/sys/kernel/iommu_groups"


def device_dir(bdf: str) -> str:
    return f"/sys/devices/pci{bdf[:7]}/{bdf}"


class Sysfs:
    """Builds and updates the tree as devices are bound and unbound."""

    def __init__(self, topology: Topology, functions: dict[str, PciFunction]):
        self.fs = FakeFilesystem(path_separator="/")
        self.topology = topology
        self.fs.create_file("/dev/vfio/vfio")
        for spec in topology.devices:
            self._add_device(spec, functions[spec.bdf])
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
        fs.create_symlink(f"{PCI_DEVICES}/{spec.bdf}", f"../../../devices/pci{spec.bdf[:7]}/{spec.bdf}")
        if spec.group is not None:
            if not fs.exists(f"{IOMMU_GROUPS}/{spec.group}/devices"):
                fs.create_dir(f"{IOMMU_GROUPS}/{spec.group}/devices")
            fs.create_symlink(f"{path}/iommu_group", f"../../../kernel/iommu_groups/{spec.group}")
            fs.create_symlink(f"{IOMMU_GROUPS}/{spec.group}/devices/{spec.bdf}", f"../../../../devices/pci{spec.bdf[:7]}/{spec.bdf}")
        self.set_driver(spec, spec.driver)

    def set_driver(self, spec: PciDeviceSpec, driver: str | None) -> None:
        fs, link = self.fs, f"{device_dir(spec.bdf)}/driver"
        if fs.exists(link) or fs.islink(link):
            fs.remove_object(link)
            fs.remove_object(f"{PCI_DRIVERS}/{spec.driver}/{spec.bdf}")
        spec.driver = driver
        if driver:
            if not fs.exists(f"{PCI_DRIVERS}/{driver}"):
                for name in ("bind", "unbind", "new_id", "remove_id"):
                    fs.create_file(f"{PCI_DRIVERS}/{driver}/{name}")
            fs.create_symlink(link, f"../../../bus/pci/drivers/{driver}")
            fs.create_symlink(f"{PCI_DRIVERS}/{driver}/{spec.bdf}", f"../../../../devices/pci{spec.bdf[:7]}/{spec.bdf}")
        if spec.group is not None:
            self.sync_group(spec.group)

    def sync_group(self, group: int) -> None:
        """/dev/vfio/N exists while any member is bound to a vfio driver."""
        node = f"/dev/vfio/{group}"
        present = any(d.driver in VFIO_DRIVERS for d in self.topology.group_members(group))
        if present and not self.fs.exists(node):
            self.fs.create_file(node)
        elif not present and self.fs.exists(node):
            self.fs.remove_object(node)

    def viable(self, group: int) -> bool:
        return all(d.driver in VIABLE_DRIVERS for d in self.topology.group_members(group))
