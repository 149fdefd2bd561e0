"""Topologies are data: which functions exist, in which IOMMU group, bound to which driver."""

from __future__ import annotations

from dataclasses import dataclass, field

from vfio_impl import uapi

# The fake mirrors the CI VM unless told otherwise, so every test that runs on real also runs on the
# fake; every tool that takes --topology defaults to it.
DEFAULT_TOPOLOGY = "vm"
VFIO_DRIVERS = ("vfio-pci", "vfio-platform", "vfio-amba", "vfio_ccw_mdev")
# Drivers that do not break a group's viability (vfio_dev_driver_allowed and unbound devices).
VIABLE_DRIVERS = (None, *VFIO_DRIVERS, "pci-stub", "pcieport")


@dataclass(slots=True)
class PciDeviceSpec:
    """One function; `bars` (index -> address) and `interrupt_line` pin down what a real
    machine's firmware assigned, otherwise the fake firmware packs the BARs itself. `options`
    are the model's, as QEMU's -device takes them (ivshmem-doorbell's chardev and vectors)."""

    bdf: str
    model: str = "edu"
    group: int | None = None
    driver: str | None = "vfio-pci"
    bars: dict[int, int] = field(default_factory=dict)
    interrupt_line: int = 0
    options: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class PlatformDeviceSpec:
    """One devicetree device under /sys/bus/BUS/devices/NAME: `bus` "platform", or "amba" for an
    ARM PrimeCell (bound to vfio-amba). `compatible` None means the device has no of_node at all;
    `group_link` overrides the iommu_group link's target, so a topology can show a link whose last
    component is not a group number. `noiommu`: the group is the one VFIO made for a device behind
    no IOMMU (vfio_noiommu_group_alloc), /dev/vfio/noiommu-N."""

    name: str
    model: str = "platform-test"
    group: int | None = None
    driver: str | None = "vfio-platform"
    compatible: list[str] | None = None
    group_link: str | None = None
    bus: str = "platform"
    noiommu: bool = False


@dataclass(slots=True)
class CcwDeviceSpec:
    """An I/O subchannel /sys/bus/css/devices/SCHID bound to vfio_ccw, with one mdev UUID under it:
    the device VFIO opens, in its own IOMMU group. `model` is the device behind the subchannel (a
    fakekernel.devices name), `devno` its device number, `chpids` its installed channel paths in
    order (None: no chpids attribute at all) and `chp_type` theirs, `regions` the optional regions
    vfio_ccw registers after the I/O region, in the driver's order.

    The rest describe a broken driver, one per check QEMU's realize makes: `sizes` overrides a
    region's size by name ("io", "async", "schib", "crw"); `flags`, `num_regions`, `num_irqs`
    and `irq_count` override what GET_INFO and GET_IRQ_INFO report."""

    schid: str
    uuid: str
    model: str = "ccw-block"
    group: int | None = None
    driver: str | None = "vfio_ccw_mdev"
    devno: int = 0xE000
    chpids: tuple[int, ...] | None = (0x11,)
    chp_type: int = 0x1B  # FICON
    regions: tuple[str, ...] = ("async", "schib", "crw")
    group_link: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    flags: int | None = None
    num_regions: int | None = None
    num_irqs: int | None = None
    irq_count: int = 1


@dataclass(slots=True)
class Topology:
    """`devices` are the PCI functions; `platform` the devicetree devices (platform and AMBA
    buses); `ccw` the vfio-ccw mdevs on s390 I/O subchannels. `enable_unsafe_noiommu_mode` is
    vfio's module parameter; a topology with a no-IOMMU group has it on, as only then can VFIO
    make one."""

    devices: list[PciDeviceSpec] = field(default_factory=list)
    name: str = "custom"
    platform: list[PlatformDeviceSpec] = field(default_factory=list)
    ccw: list[CcwDeviceSpec] = field(default_factory=list)
    enable_unsafe_noiommu_mode: bool = False

    def __post_init__(self) -> None:
        self.enable_unsafe_noiommu_mode |= any(d.noiommu for d in self.platform)

    @classmethod
    def default(cls) -> "Topology":
        """An edu at 00:03.0 alone in group 3: what most tests need."""
        return cls([PciDeviceSpec("0000:00:03.0", "edu", 3)], "default")

    @classmethod
    def named(cls, name: str) -> "Topology":
        try:
            specs = NAMED[name]()
        except KeyError:
            raise ValueError(f"unknown topology {name!r}; known: {', '.join(sorted(NAMED))}") from None
        return cls([s for s in specs if isinstance(s, PciDeviceSpec)], name,
                   [s for s in specs if isinstance(s, PlatformDeviceSpec)],
                   [s for s in specs if isinstance(s, CcwDeviceSpec)])

    def group_members(self, group: int) -> list[PciDeviceSpec]:
        return [d for d in self.devices if d.group == group]

    def platform_members(self, group: int) -> list[PlatformDeviceSpec]:
        return [d for d in self.platform if d.group == group]

    def ccw_members(self, group: int) -> list[CcwDeviceSpec]:
        return [d for d in self.ccw if d.group == group]

    def groups(self) -> list[int]:
        return sorted({d.group for d in (*self.devices, *self.platform, *self.ccw) if d.group is not None})

    def noiommu(self, group: int) -> bool:
        """Whether the group is a no-IOMMU one (VFIO_NO_IOMMU), which its devices' specs say."""
        return any(d.noiommu for d in self.platform_members(group))


TEST_COMPATIBLE = ["qemu,platform-test", "vfio,test-device"]


def _virt_board() -> list[PlatformDeviceSpec]:
    """The arm64 runner's QEMU virt board (hw/arm/virt.c): its RTC and GPIO PrimeCells bound to
    vfio-amba and its first virtio-mmio slot, left empty, bound to vfio-platform, each in the
    no-IOMMU group VFIO made for it when it was bound; the next slot stays with virtio-mmio, so it
    has no group."""
    return [
        PlatformDeviceSpec("9010000.pl031", "pl031", 0, "vfio-amba", ["arm,pl031", "arm,primecell"], bus="amba",
                           noiommu=True),
        PlatformDeviceSpec("9030000.pl061", "pl061", 1, "vfio-amba", ["arm,pl061", "arm,primecell"], bus="amba",
                           noiommu=True),
        PlatformDeviceSpec("a000000.virtio_mmio", "virtio-mmio", 2, "vfio-platform", ["virtio,mmio"], noiommu=True),
        PlatformDeviceSpec("a000200.virtio_mmio", "virtio-mmio", None, "virtio-mmio", ["virtio,mmio"])]


def _mdev(schid: str, group: int | None, **kwargs) -> CcwDeviceSpec:
    """A vfio-ccw mdev whose UUID ends in its subchannel number, so a test can tell them apart."""
    return CcwDeviceSpec(schid, f"8a1c0bd0-7e7a-4f6a-9c3e-{int(schid[-4:], 16):012x}", group=group, **kwargs)


# The mdev the s390x CI guest creates on its virtio-blk-ccw subchannel: its runner writes this
# UUID to the subchannel's mdev_supported_types/vfio_ccw-io/create, so a recording names the
# device the fake has (a recording under another UUID replays with the mirror renamed to it).
GUEST_MDEV_UUID = "9a8b1f6e-2c3d-4e5f-8a9b-0c1d2e3f4a5b"


def _guest_mdev() -> CcwDeviceSpec:
    """QEMU's virtio-blk-ccw at devno fe.0.0001 (-device virtio-blk-ccw,devno=fe.0.0001): the guest
    sees it on subchannel 0.0.0001 with device number 0001, behind QEMU's one virtual channel
    path, chpid 00 of type 0x32 (css_sch_build_virtual_schib); its mdev is the guest's only
    IOMMU group, 0."""
    return CcwDeviceSpec("0.0.0001", GUEST_MDEV_UUID, "virtio-blk-ccw", 0, devno=0x0001, chpids=(0x00,),
                         chp_type=0x32)


NAMED = {
    "default": lambda: [PciDeviceSpec("0000:00:03.0", "edu", 3)],
    "shared-group": lambda: [PciDeviceSpec("0000:01:00.0", "edu", 5), PciDeviceSpec("0000:01:01.0", "edu", 5)],
    "two-groups": lambda: [PciDeviceSpec("0000:00:03.0", "edu", 3), PciDeviceSpec("0000:00:04.0", "edu", 4)],
    "nonviable": lambda: [PciDeviceSpec("0000:01:00.0", "edu", 5),
                          PciDeviceSpec("0000:01:01.0", "edu", 5, driver="edu-host-driver")],
    "no-group": lambda: [PciDeviceSpec("0000:00:03.0", "edu", None)],
    # ci/real-vm.sh: its groups, and where its SeaBIOS put each BAR and routed each pin.
    "vm": lambda: [PciDeviceSpec("0000:00:03.0", "edu", 1, bars={0: 0xFE400000}, interrupt_line=0x0B),
                   PciDeviceSpec("0000:00:04.0", "ivshmem", 2, bars={0: 0xFE500000, 2: 0xFE800000}),
                   PciDeviceSpec("0000:00:06.0", "ivshmem-doorbell", 4, options={"vectors": 2},
                                 bars={0: 0xFE502000, 1: 0xFE503000, 2: 0xFE900000}),
                   PciDeviceSpec("0000:01:00.0", "e1000e", 9, interrupt_line=0x0A,
                                 bars={0: 0xFE200000, 1: 0xFE220000, 2: 0xC000, 3: 0xFE240000})],
    # vfio-platform as QEMU's hw/vfio/platform.c meets it: one good device and one of each way
    # its realize can fail that no board shows (no group, a group link that is not a number, no
    # of_node to read compatible from); then the arm64 runner's devices, among them the AMBA
    # PrimeCells vfio-platform refuses.
    "platform": lambda: [
        PlatformDeviceSpec("c0000000.platform-test", "platform-test", 20, compatible=TEST_COMPATIBLE),
        PlatformDeviceSpec("c1000000.no-group", "platform-test", None, compatible=TEST_COMPATIBLE),
        PlatformDeviceSpec("c2000000.bad-group", "platform-test", None, compatible=TEST_COMPATIBLE,
                           group_link="../../../kernel/iommu_groups/bogus"),
        PlatformDeviceSpec("c4000000.no-of-node", "platform-test", 24, compatible=None),
        *_virt_board()],
    # vfio-ccw as the s390x CI guest has it, then as QEMU's hw/vfio/ccw.c meets it: the fake's
    # block store on a subchannel with every optional region, one with only the I/O region, and
    # one broken mdev per realize check.
    "ccw": lambda: [
        _guest_mdev(),
        _mdev("0.0.0313", 30),
        _mdev("0.0.0314", 31, regions=()),
        _mdev("0.0.0315", None),
        _mdev("0.0.0316", None, group_link="../../../../kernel/iommu_groups/bogus"),
        _mdev("0.0.0317", 33, flags=uapi.VFIO_DEVICE_FLAGS_PLATFORM | uapi.VFIO_DEVICE_FLAGS_RESET),
        _mdev("0.0.0318", 34, num_regions=0),
        _mdev("0.0.0319", 35, sizes={"io": 120}),
        _mdev("0.0.031a", 36, sizes={"async": 4}),
        _mdev("0.0.031b", 37, sizes={"schib": 48}),
        _mdev("0.0.031c", 38, sizes={"crw": 4}),
        _mdev("0.0.031d", 39, num_irqs=0),
        _mdev("0.0.031e", 40, irq_count=0),
        _mdev("0.0.031f", 41, num_irqs=1),
        _mdev("0.0.0320", 42, chpids=None)],
}
