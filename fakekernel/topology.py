"""Topologies are data: which functions exist, in which IOMMU group, bound to which driver."""

from __future__ import annotations

from dataclasses import dataclass, field

VFIO_DRIVERS = ("vfio-pci",)
# Drivers that do not break a group's viability (vfio_dev_driver_allowed and unbound devices).
VIABLE_DRIVERS = (None, "vfio-pci", "pci-stub", "pcieport")


@dataclass(slots=True)
class PciDeviceSpec:
    """One function; `bars` (index -> address) and `interrupt_line` pin down what a real
    machine's firmware assigned, otherwise the fake firmware packs the BARs itself."""

    bdf: str
    model: str = "edu"
    group: int | None = None
    driver: str | None = "vfio-pci"
    bars: dict[int, int] = field(default_factory=dict)
    interrupt_line: int = 0


@dataclass(slots=True)
class Topology:
    devices: list[PciDeviceSpec] = field(default_factory=list)
    name: str = "custom"

    @classmethod
    def default(cls) -> "Topology":
        """An edu at 00:03.0 alone in group 3: what most tests need."""
        return cls([PciDeviceSpec("0000:00:03.0", "edu", 3)], "default")

    @classmethod
    def named(cls, name: str) -> "Topology":
        try:
            devices = NAMED[name]()
        except KeyError:
            raise ValueError(f"unknown topology {name!r}; known: {', '.join(sorted(NAMED))}") from None
        return cls(devices, name)

    def group_members(self, group: int) -> list[PciDeviceSpec]:
        return [d for d in self.devices if d.group == group]

    def groups(self) -> list[int]:
        return sorted({d.group for d in self.devices if d.group is not None})


NAMED = {
    "default": lambda: [PciDeviceSpec("0000:00:03.0", "edu", 3)],
    "shared-group": lambda: [PciDeviceSpec("0000:01:00.0", "edu", 5), PciDeviceSpec("0000:01:01.0", "edu", 5)],
    "two-groups": lambda: [PciDeviceSpec("0000:00:03.0", "edu", 3), PciDeviceSpec("0000:00:04.0", "edu", 4)],
    "nonviable": lambda: [PciDeviceSpec("0000:01:00.0", "edu", 5),
                          PciDeviceSpec("0000:01:01.0", "edu", 5, driver="edu-host-driver")],
    "no-group": lambda: [PciDeviceSpec("0000:00:03.0", "edu", None)],
    # ci/real-vm.sh: its groups, and where its SeaBIOS put each BAR and routed each pin.
    "vm": lambda: [PciDeviceSpec("0000:00:03.0", "edu", 1, bars={0: 0xFE600000}, interrupt_line=0x0B),
                   PciDeviceSpec("0000:00:04.0", "ivshmem", 2, bars={0: 0xFE700000, 2: 0xFEA00000}),
                   PciDeviceSpec("0000:01:00.0", "e1000e", 8, interrupt_line=0x0A,
                                 bars={0: 0xFE400000, 1: 0xFE420000, 2: 0xC000, 3: 0xFE440000})],
}
