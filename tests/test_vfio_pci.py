"""vfio_impl.flavours.pci on the fake kernel: realize order and unwinding, config virtualization, BARs with
the MSI-X hole, ROM, INTx with EOI and the mmap timer, MSI, MSI-X, reset, DMA, and acceptance."""

import errno
import gc
import os
import struct
import time

import pytest

from conformance.backends import fake_kernel
from fakekernel import FakeKernel, Topology, devices
from fakekernel import pci as fpci
from fakekernel.faults import Fault
from fakekernel.topology import PciDeviceSpec
from vfio_impl import AddressSpace, Machine, VFIOError, VirtualClock, uapi
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.pci import PCI_ROM_SLOT, VFIOPCIDevice
from vfio_impl.vmm.machine import MSIRoute

EDU = "0000:00:03.0"
TEST = "0000:01:00.0"
PAGE = os.sysconf("SC_PAGE_SIZE")
CONFIG = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
ROM = uapi.VFIO_PCI_ROM_REGION_INDEX << 40
INTX, MSI, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX
RAISE, ACK, FACT, STATUS = 0x60, 0x64, 0x08, 0x20
ROM_IMAGE = b"\x55\xaa" + bytes(range(256)) * 3


class MsixTestFunction(fpci.PciFunction):
    """A function with what edu lacks: PM, 4-vector MSI with mask bits, MSI-X in a 64-bit BAR, a ROM,
    the multifunction bit and a reset; on bus 01, so it has a hot-reset set."""

    vendor_id, device_id = 0x1B36, 0x0005
    interrupt_pin = 1
    msix_vectors = 8
    reset_works = True
    model = "msix-test"

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(0, fpci.Bar(0x1000))
        self.add_bar(2, fpci.Bar(0x10000, kind=fpci.BAR_MEM64, prefetch=True))
        self.add_bar(4, fpci.Bar(0x1000, ram=True))
        self.add_capability(fpci.PCI_CAP_ID_PM, 0x48, 8)
        self.add_msi(0x50, vectors_log2=2, is_64bit=True, maskbit=True)
        self.add_capability(fpci.PCI_CAP_ID_MSIX, 0x70, 12)
        struct.pack_into("<HII", self.config, 0x72, self.msix_vectors - 1, 0x3000 | 2, 0x3800 | 2)
        self.config[fpci.PCI_HEADER_TYPE] = 0x80
        self.set_rom(ROM_IMAGE, 0x2000)
        self.mmio_writes: list[tuple[int, int, int, int]] = []

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.mmio_writes.append((bar, offset, size, value))


@pytest.fixture
def test_model(monkeypatch):
    monkeypatch.setitem(devices.CATALOG, MsixTestFunction.model, MsixTestFunction)
    return Topology([PciDeviceSpec(TEST, MsixTestFunction.model, 7)], "msix-test")


@pytest.fixture
def kernel():
    with FakeKernel() as k:
        yield k


@pytest.fixture
def clock():
    return VirtualClock()


def _space(kernel, clock):
    with AddressSpace(kernel, Machine(clock)) as s:
        yield s


@pytest.fixture
def space(kernel, clock):
    yield from _space(kernel, clock)


@pytest.fixture
def edu(space):
    with VFIOPCIDevice.realize(space, space.machine, host=EDU, x_kvm_intx=False) as dev:
        yield dev


@pytest.fixture
def tkernel(test_model):
    with FakeKernel(test_model) as k:
        yield k


@pytest.fixture
def tspace(tkernel, clock):
    yield from _space(tkernel, clock)


@pytest.fixture
def tdev(tspace):
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST, x_kvm_intx=False) as dev:
        dev.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
        yield dev


def poll_until(machine, predicate, timeout=2.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        machine.poll(0.01)
    return True


# -- failure injection ------------------------------------------------------------------------
class FaultyHost:
    """The fake kernel with chosen calls failing (fail gives an errno), answered without reaching
    it (instead gives a value), or with their answers changed (after)."""

    def __init__(self, kernel, fail=lambda name, args: 0, after=lambda name, args, result: result,
                 instead=lambda name, args: None):
        self._kernel, self._fail, self._after, self._instead = kernel, fail, after, instead

    def __getattr__(self, name):
        attr = getattr(self._kernel, name)
        if not callable(attr):
            return attr

        def call(*args):
            code = self._fail(name, args)
            if code:
                raise OSError(code, os.strerror(code))
            answer = self._instead(name, args)
            return self._after(name, args, attr(*args) if answer is None else answer)
        return call


def ioctl_is(request, index=None, layout=None, flags=None):
    def match(name, args):
        if name != "ioctl" or args[1] != request:
            return False
        if index is None:
            return True
        hdr = layout.unpack(bytes(args[2]))
        return hdr.index == index and (flags is None or hdr.flags & flags == flags)
    return match


def region_info(index):
    return ioctl_is(uapi.VFIO_DEVICE_GET_REGION_INFO, index, uapi.vfio_region_info)


def set_irqs(index, flags=None):
    return ioctl_is(uapi.VFIO_DEVICE_SET_IRQS, index, uapi.vfio_irq_set, flags)


def pread_at(offset):
    return lambda name, args: name == "pread" and args[2] == offset


def failing(predicate, code=errno.EIO):
    return lambda name, args: code if predicate(name, args) else 0


def open_fds():
    """After a collection: earlier tests' machines close their epoll fds whenever the collector
    finds them, which would otherwise happen between two counts."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def assert_nothing_left(kernel, space, before):
    assert open_fds() == before
    assert kernel.live_mappings() == 0 and kernel.open_files() == {}
    assert space.groups == {} and space.containers == [] and space.machine.listeners == []
    assert not space.machine.fd_handlers and space.machine.next_deadline() is None


def _device_info_mangled(field, value):
    def after(name, args, result):
        if name == "ioctl" and args[1] == uapi.VFIO_DEVICE_GET_INFO:
            info = uapi.vfio_device_info.unpack(args[2])
            fields = dict(argsz=info.argsz, flags=info.flags, num_regions=info.num_regions, num_irqs=info.num_irqs)
            fields[field] = value(info)
            uapi.vfio_device_info.pack_into(args[2], 0, **fields)
        return result
    return after


REALIZE_FAILURES = [
    ("readlink", dict(fail=failing(lambda n, a: n == "readlink")), "vfio: error no iommu_group for device"),
    ("group number", dict(instead=lambda n, a: "../../../kernel/iommu_groups/bogus" if n == "readlink" else None),
     "vfio: error reading /sys/bus/pci/devices/0000:01:00.0/iommu_group"),
    ("group open", dict(fail=failing(lambda n, a: n == "open" and a[0].startswith("/dev/vfio/7"))),
     "vfio: failed to get group 7: vfio: error opening /dev/vfio/7"),
    ("group status", dict(fail=failing(ioctl_is(uapi.VFIO_GROUP_GET_STATUS))), "error getting group status"),
    ("SET_IOMMU", dict(fail=failing(ioctl_is(uapi.VFIO_SET_IOMMU))), "failed to set iommu for container"),
    ("GET_DEVICE_FD", dict(fail=failing(ioctl_is(uapi.VFIO_GROUP_GET_DEVICE_FD))),
     "vfio: failed to get device 0000:01:00.0: vfio: error getting device 0000:01:00.0 from group 7"),
    ("GET_INFO", dict(fail=failing(ioctl_is(uapi.VFIO_DEVICE_GET_INFO))), "vfio: failed to get device 0000:01:00.0: vfio: error getting device info"),
    ("not PCI", dict(after=_device_info_mangled("flags", lambda i: i.flags & ~uapi.VFIO_DEVICE_FLAGS_PCI)),
     "vfio: failed to get device 0000:01:00.0: vfio: Um, this isn't a PCI device"),
    ("regions", dict(after=_device_info_mangled("num_regions", lambda i: CONFIG >> 40)),
     "vfio: failed to get device 0000:01:00.0: vfio: unexpected number of io regions 7"),
    ("irqs", dict(after=_device_info_mangled("num_irqs", lambda i: MSIX)), "vfio: failed to get device 0000:01:00.0: vfio: unexpected number of irqs 2"),
    ("BAR3 info", dict(fail=failing(region_info(3))), "vfio: failed to get device 0000:01:00.0: vfio: Error getting region 3 info"),
    ("ROM info", dict(fail=failing(region_info(6))), "vfio: failed to get device 0000:01:00.0: vfio: Error getting ROM info"),
    ("config info", dict(fail=failing(region_info(7))), "vfio: failed to get device 0000:01:00.0: vfio: Error getting config info"),
    ("config copy", dict(fail=failing(pread_at(CONFIG))), "vfio: Failed to read device config space"),
    ("MSI-X early", dict(fail=failing(pread_at(CONFIG + 0x72))), "vfio: failed to read PCI MSI-X capability"),
    ("MSI flags", dict(fail=failing(pread_at(CONFIG + 0x52))),
     "vfio: 0000:01:00.0 Error adding PCI capability 0x5[0x20]@0x50: vfio: failed to read PCI MSI FLAGS"),
    ("INTx eventfd", dict(fail=failing(lambda n, a: n == "eventfd", errno.EMFILE)),
     "vfio: Error: event_notifier_init failed"),
    ("INTx trigger", dict(fail=failing(set_irqs(INTX, uapi.VFIO_IRQ_SET_ACTION_TRIGGER))),
     "vfio: Error: Failed to setup INTx fd"),
]


@pytest.mark.parametrize("faults,message", [f[1:] for f in REALIZE_FAILURES], ids=[f[0] for f in REALIZE_FAILURES])
def test_a_failing_realize_step_unwinds_everything_before_it(tkernel, clock, faults, message):
    warm = AddressSpace(tkernel, Machine(clock))
    VFIOPCIDevice.realize(warm, warm.machine, host=TEST).exit()
    machine = Machine(clock)
    before = open_fds()
    space = AddressSpace(FaultyHost(tkernel, **faults), machine)
    with pytest.raises(VFIOError) as exc:
        VFIOPCIDevice.realize(space, space.machine, host=TEST)
    assert message in str(exc.value)
    assert_nothing_left(tkernel, space, before)
    with VFIOPCIDevice.realize(warm, warm.machine, host=TEST) as again:
        assert again.interrupt == "intx", "the failed realize left the device unusable"


IOCTL_NAMES = {number: name for name, number in uapi.IOCTLS.items()}


def test_realize_runs_its_steps_in_the_seeds_order(tkernel, clock):
    calls = []

    def record(name, args):
        if name == "ioctl" and args[1] == uapi.VFIO_DEVICE_GET_REGION_INFO:
            step = f"REGION_INFO[{uapi.vfio_region_info.unpack(bytes(args[2])).index}]"
            if calls[-1] != step:
                calls.append(step)
        elif name == "ioctl":
            calls.append(IOCTL_NAMES[args[1]])
        elif name == "pread":
            calls.append(f"pread {args[2] >> 40}+{args[2] & 0xFFFF:#x}")
        elif name in ("readlink", "mmap", "eventfd"):
            calls.append(name)
        return 0
    space = AddressSpace(FaultyHost(tkernel, fail=record), Machine(clock))
    VFIOPCIDevice.realize(space, space.machine, host=TEST, x_kvm_intx=False).exit()
    expected = ["readlink", "VFIO_GROUP_GET_STATUS", "VFIO_GET_API_VERSION", "VFIO_GROUP_SET_CONTAINER",
                "VFIO_SET_IOMMU", "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_GET_INFO",
                *[f"REGION_INFO[{i}]" for i in range(8)],
                "pread 7+0x0", "pread 6+0x0", "pread 7+0x72", "pread 7+0x18", "mmap", "pread 7+0x52",
                "pread 7+0x3d", "eventfd", "VFIO_DEVICE_SET_IRQS"]
    at = 0
    for step in expected:
        assert step in calls[at:], f"{step} missing after {calls[at - 1] if at else 'the start'}"
        at = calls.index(step, at) + 1
    assert sum(c.startswith("REGION_INFO") for c in calls) == 8, "region info asked again after realize"


def test_realize_needs_a_host_device(space):
    with pytest.raises(VFIOError, match="No provided host device"):
        VFIOPCIDevice.realize(space, space.machine)
    with pytest.raises(VFIOError, match="doesn't take value"):
        VFIOPCIDevice.realize(space, space.machine, host="03.0.1")
    with pytest.raises(VFIOError, match="no such host device: /sys/bus/pci/devices/0000:00:09.0"):
        VFIOPCIDevice.realize(space, space.machine, host="00:09.0")


def test_realize_by_sysfsdev_and_short_host(space):
    with VFIOPCIDevice.realize(space, space.machine, sysfsdev=f"/sys/bus/pci/devices/{EDU}/") as dev:
        assert dev.name == EDU
    with VFIOPCIDevice.realize(space, space.machine, host="00:03.0") as dev:
        assert dev.name == EDU


def test_a_device_realized_twice_is_already_attached(space, edu):
    with pytest.raises(VFIOError, match="device 0000:00:03.0 is already attached"):
        VFIOPCIDevice.realize(space, space.machine, host=EDU)
    assert edu.bar_read(0, 0, 4) == 0x010000ED


def test_realize_refuses_a_nonviable_group(clock):
    with FakeKernel("nonviable") as k, AddressSpace(k, Machine(clock)) as space:
        with pytest.raises(VFIOError, match="group 5 is not viable, please ensure all devices"):
            VFIOPCIDevice.realize(space, space.machine, host="0000:01:00.0")
        assert space.groups == {}


def test_the_machine_must_be_the_spaces(space):
    with pytest.raises(VFIOError, match="address space's machine"):
        VFIOPCIDevice.realize(space, Machine(), host=EDU)


def test_exit_releases_everything_and_twice_is_harmless(kernel, clock):
    space = AddressSpace(kernel, Machine(clock))
    VFIOPCIDevice.realize(space, space.machine, host=EDU).exit()
    before = open_fds()
    dev = VFIOPCIDevice.realize(space, space.machine, host=EDU)
    assert kernel.live_mappings() == 1 and open_fds() != before
    dev.exit()
    dev.exit()
    assert_nothing_left(kernel, space, before)


def test_a_missing_reset_is_a_warning(space):
    with TraceRecorder() as tr, VFIOPCIDevice.realize(space, space.machine, host=EDU) as dev:
        assert not dev.reset_works
    assert "Warning, device 0000:00:03.0 does not support reset" in [f["message"] for f in tr.named("warning")]


# -- config space -------------------------------------------------------------------------------
def test_header_reads_come_from_the_device_and_bars_are_cleared_in_the_copy(edu, kernel):
    assert edu.config_read(0, 4) == 0x11E81234
    assert edu.config_read(fpci.PCI_BASE_ADDRESS_0, 4) == 0xFE000000
    assert edu.config[fpci.PCI_BASE_ADDRESS_0:fpci.PCI_BASE_ADDRESS_0 + 24] == bytes(24)
    kernel.functions[EDU].config[fpci.PCI_REVISION_ID] = 0x42
    assert edu.config_read(fpci.PCI_REVISION_ID, 1) == 0x42


def test_the_rom_bar_and_msi_capability_are_emulated(edu, kernel):
    edu.config_write(fpci.PCI_ROM_ADDRESS, 0xFFFFFFFF, 4)
    assert edu.config_read(fpci.PCI_ROM_ADDRESS, 4) == 0, "edu has no ROM: nothing of the ROM BAR is writable"
    kernel.functions[EDU].config[0x44] = 0x99
    assert edu.config_read(0x44, 1) == 0, "an MSI read reached the device"
    edu.config_write(0x44, 0xFEE01000, 4)
    assert edu.config_read(0x44, 4) == 0xFEE01000
    assert kernel.vfio_devices[EDU].config_read(0x44, 4) == 0xFEE01000, "the write skipped the device"


def test_the_multifunction_bit_is_virtualized(tspace):
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST) as dev:
        assert dev.config_read(fpci.PCI_HEADER_TYPE, 1) == 0
        assert dev.config_read(0x0C, 4) & 0x800000 == 0
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST, multifunction=True) as dev:
        assert dev.config_read(fpci.PCI_HEADER_TYPE, 1) == 0x80
        assert dev.config_read(0x0C, 4) & 0x800000


def test_config_writes_reach_the_device_then_the_header_copy(edu, kernel):
    edu.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
    assert kernel.functions[EDU].bus_master()
    assert edu.config[fpci.PCI_COMMAND] == fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER


def test_the_capability_chain_is_rebuilt_in_the_devices_order(tdev):
    chain, pos = [], tdev.config[fpci.PCI_CAPABILITY_LIST]
    while pos:
        chain.append((pos, tdev.config[pos]))
        pos = tdev.config[pos + 1]
    assert chain == [(0x48, fpci.PCI_CAP_ID_PM), (0x50, fpci.PCI_CAP_ID_MSI), (0x70, fpci.PCI_CAP_ID_MSIX)]
    assert (tdev.msi_cap, tdev.msi_cap_size) == (0x50, 0xA + 0xA + 4)
    assert tdev.config_read(0x72, 2) == 7 and tdev.config_read(0x74, 4) == 0x3002


def test_edu_msi_cap_size_is_64bit_without_mask(edu):
    assert (edu.msi_cap, edu.msi_cap_size) == (0x40, 0xE)


def test_msi_vector_count_is_clamped_to_the_devices_only_once_msi_is_on(edu):
    """msi_write_config returns before the clamp while ENABLE is clear, as QEMU's does."""
    edu.config_write(0x42, 0x70, 2)
    assert edu.config_read(0x42, 2) & 0x70 == 0x70 and edu.interrupt == "intx"
    edu.config_write(0x42, 0x71, 2)
    assert edu.config_read(0x42, 2) & 0x71 == 0x01 and edu.nr_vectors == 1


def test_config_access_errors_are_reported_not_raised(kernel, space):
    broken = AddressSpace(FaultyHost(kernel, fail=failing(pread_at(CONFIG + 8))), space.machine)
    with TraceRecorder() as tr, VFIOPCIDevice.realize(broken, broken.machine, host=EDU) as dev:
        assert dev.config_read(8, 4) == 0xFFFFFFFF
        assert dev.config_read(fpci.PCI_CFG_SPACE_SIZE, 2) == 0xFFFF
        with pytest.raises(VFIOError, match="unsupported config read size"):
            dev.config_read(0, 3)
    assert any("vfio_pci_read_config(0000:00:03.0, 0x8, 0x4) failed" in f["message"] for f in tr.named("error"))


# -- BARs, MSI-X hole, ROM ------------------------------------------------------------------------
def test_bars_have_their_type_and_skip_the_unimplemented(tdev):
    bar0, bar2 = tdev.bars[0], tdev.bars[2]
    assert (bar0.size, bar0.ioport, bar0.mem64) == (0x1000, False, False)
    assert (bar2.size, bar2.mem64, bar2.prefetch) == (0x10000, True, True)
    assert [b.size for b in tdev.bars] == [0x1000, 0, 0x10000, 0, 0x1000, 0] and not tdev.bars[3].areas
    assert tdev.config[0x18] == fpci.BAR_MEM64 | fpci.BAR_PREFETCH
    tdev.config_write(0x18, 0xFFFFFFFF, 4)
    assert tdev.config[0x18:0x1C] == struct.pack("<I", 0xFFFF000C)


def bar2_caps(kernel, change):
    """Have the fake report BAR2 with other region caps (the kernel decides MSIX_MAPPABLE)."""
    device = kernel.vfio_devices[TEST]
    plain = device.region_info

    def region_info(index):
        flags, size, caps = plain(index)
        return flags, size, change(caps) if index == 2 else caps
    device.region_info = region_info


def without_msix_mappable(caps):
    return [c for c in caps if not isinstance(c, uapi.MsixMappableCap)]


def test_the_msix_table_page_is_a_hole_in_the_mmaps(tkernel, tspace):
    bar2_caps(tkernel, without_msix_mappable)
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST) as dev:
        assert [(a.offset, a.size) for a in dev.bars[2].areas] == [(0, 0x3000), (0x4000, 0xC000)]
        assert [(a.offset, a.size) for a in dev.bars[0].areas] == [(0, 0x1000)]


def test_msix_table_writes_stay_in_vfio_impl(tdev, tkernel):
    fn = tkernel.functions[TEST]
    tdev.bar_write(2, 0x3010, 0xFEE00000, 4)
    tdev.bar_write(2, 0x3018, 0x4321, 4)
    assert tdev.bar_read(2, 0x3010, 4) == 0xFEE00000 and tdev.bar_read(2, 0x301C, 4) == 1
    assert tdev.msix_get_message(1) == (0xFEE00000, 0x4321)
    tdev.bar_write(2, 0x3800, 0xFF, 4)
    assert tdev.bar_read(2, 0x3800, 4) == 0, "the PBA is read-only"
    tdev.bar_write(2, 0x3A00, 7, 4)
    assert fn.mmio_writes == [(2, 0x3A00, 4, 7)], "only the access outside the table and PBA reached the device"


@pytest.mark.parametrize("cap,areas", [
    (uapi.MsixMappableCap(), [(0, 0x10000)]),
    (uapi.SparseMmapCap(((0, 0x2000), (0x8000, 0x8000))), [(0, 0x2000), (0x8000, 0x8000)]),
], ids=["msix-mappable", "sparse"])
def test_region_caps_shape_the_mmaps(tkernel, tspace, cap, areas):
    bar2_caps(tkernel, lambda caps: without_msix_mappable(caps) + [cap])
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST) as dev:
        assert [(a.offset, a.size) for a in dev.bars[2].areas] == areas
        dev.bar_write(2, 0x3000, 0x1234, 4)
        assert dev.bar_read(2, 0x3000, 4) == 0x1234 and not tkernel.functions[TEST].mmio_writes


def test_a_refused_mmap_leaves_the_slow_path(kernel, space):
    broken = AddressSpace(FaultyHost(kernel, fail=failing(lambda n, a: n == "mmap", errno.EINVAL)), space.machine)
    with TraceRecorder() as tr, VFIOPCIDevice.realize(broken, broken.machine, host=EDU) as dev:
        assert not dev.bars[0].areas and dev.bar_read(0, 0, 4) == 0x010000ED
    assert "VFIO 0000:00:03.0 BAR 0 mmap unsupported. Performance may be slow" in [
        f["message"] for f in tr.named("error")]


def test_bar_access_is_little_endian_and_sized(tdev, tspace):
    dev = tdev
    with pytest.raises(VFIOError, match="unsupported read size, 8 bytes"):
        dev.bar_read(0, 0, 8)
    with pytest.raises(VFIOError, match="unsupported write size, 3 bytes"):
        dev.bar_write(0, 0, 1, 3)
    dev.bar_write(2, 0x3000, 0x11223344, 4)
    assert dev.bar_read(2, 0x3000, 1) == 0x44 and dev.bar_read(2, 0x3002, 2) == 0x1122


def test_mapped_ram_takes_aligned_accesses_and_traps_misaligned_ones(tdev):
    tdev.bar_write(4, 0x10, 0x11223344, 4)
    tdev.bar_write(4, 0x14, 0xAB, 1)
    with TraceRecorder() as tr:
        assert tdev.bar_read(4, 0x10, 4) == 0x11223344 and tdev.bar_read(4, 0x12, 2) == 0x1122
        assert not tr.named("vfio_region_read")
        assert tdev.bar_read(4, 0x13, 2) == 0xAB11
    assert [f["addr"] for f in tr.named("vfio_region_read")] == [0x13]


def test_a_failed_bar_access_is_reported_not_raised(kernel, space):
    broken = AddressSpace(FaultyHost(kernel, fail=failing(lambda n, a: n in ("pread", "pwrite") and a[-1] == 0x10)),
                          space.machine)
    with TraceRecorder() as tr, VFIOPCIDevice.realize(broken, broken.machine, host=EDU, x_kvm_intx=False) as dev:
        dev.bars[0].region.mmap_enabled = False
        assert dev.bar_read(0, 0x10, 4) == 0xFFFFFFFF
        dev.bar_write(0, 0x10, 1, 4)
    messages = [f["message"] for f in tr.named("error")]
    assert any(m.startswith("vfio_bar_read(BAR0+0x10, 4) failed") for m in messages)
    assert any(m.startswith("vfio_bar_write(BAR0+0x10, 0x1, 4) failed") for m in messages)


def test_the_rom_is_loaded_and_emulated_behind_the_rom_bar(tdev):
    assert tdev.rom == ROM_IMAGE + b"\xff" * (0x2000 - len(ROM_IMAGE))
    tdev.config_write(fpci.PCI_ROM_ADDRESS, 0xFFFFFFFF, 4)
    assert tdev.config_read(fpci.PCI_ROM_ADDRESS, 4) == 0xFFFFE001


def test_the_guest_reads_the_rom_through_the_rom_bar_which_is_ram(tdev, tkernel, tspace):
    """No trap and no EOI: the seed's ROM BAR is a RAM region with the image in it."""
    image = ROM_IMAGE + b"\xff" * (0x2000 - len(ROM_IMAGE))
    tdev.vbasedev.trigger_irq(INTX)
    assert poll_until(tspace.machine, lambda: tdev.intx.pending)
    assert tdev.bar_read(PCI_ROM_SLOT, 0, 2) == 0xAA55
    assert tdev.intx.pending, "a ROM read was taken for the EOI"
    assert b"".join(tdev.bar_read(PCI_ROM_SLOT, off, 4).to_bytes(4, "little") for off in range(0, 0x2000, 4)) == image
    assert tdev.bar_read(PCI_ROM_SLOT, 0x1FFF, 1) == 0xFF
    tdev.bar_write(PCI_ROM_SLOT, 0x10, 0x12345678, 4)
    assert tdev.bar_read(PCI_ROM_SLOT, 0x10, 2) == 0x5678 and tdev.rom[0x10:0x14] == b"\x78\x56\x34\x12"
    assert tkernel.functions[TEST].rom[0x10:0x14] == ROM_IMAGE[0x10:0x14], "the write reached the device"
    for addr, size in ((0x2000, 1), (0x1FFE, 4), (-1, 1)):
        with pytest.raises(VFIOError, match="ROM BAR"):
            tdev.bar_read(PCI_ROM_SLOT, addr, size)
    with pytest.raises(VFIOError, match="unsupported read size"):
        tdev.bar_read(PCI_ROM_SLOT, 0, 3)


def test_without_a_rom_there_is_no_rom_bar_to_read(tspace):
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST, rombar=0) as dev:
        with pytest.raises(VFIOError, match="no 4-byte access at ROM BAR"):
            dev.bar_read(PCI_ROM_SLOT, 0, 4)
        with pytest.raises(VFIOError, match="ROM BAR"):
            dev.bar_write(PCI_ROM_SLOT, 0, 0, 4)


def test_rom_reads_retry_eintr_and_stop_at_a_short_end(tkernel, tspace):
    state = {"eintr": 1}

    def fail(name, args):
        if name == "pread" and args[2] >= ROM and args[2] < CONFIG and state["eintr"]:
            state["eintr"] -= 1
            return errno.EINTR
        return 0

    def after(name, args, result):
        if name == "pread" and ROM <= args[2] < CONFIG:
            return result[:0x100] if args[2] < ROM + 0x300 else b""
        return result
    space = AddressSpace(FaultyHost(tkernel, fail, after), tspace.machine)
    with VFIOPCIDevice.realize(space, space.machine, host=TEST) as dev:
        assert dev.rom == ROM_IMAGE[:0x300] + b"\xff" * (0x2000 - 0x300)


def test_a_rom_read_error_leaves_no_rom(tkernel, tspace):
    space = AddressSpace(FaultyHost(tkernel, fail=failing(pread_at(ROM))), tspace.machine)
    with TraceRecorder() as tr, VFIOPCIDevice.realize(space, space.machine, host=TEST) as dev:
        assert dev.rom is None and dev.config_read(fpci.PCI_ROM_ADDRESS, 4) == 0
    assert any(f["message"].startswith("vfio: Error reading device ROM") for f in tr.named("error"))


def test_rombar_0_skips_the_rom_and_a_romfile_replaces_it(tspace, tmp_path):
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST, rombar=0) as dev:
        assert dev.rom is None
    romfile = tmp_path / "option.rom"
    romfile.write_bytes(b"\x55\xaa" + b"x" * 3000)
    with VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST, romfile=str(romfile)) as dev:
        assert dev.rom == b"\x55\xaa" + b"x" * 3000 + b"\xff" * (4096 - 3002)
    with pytest.raises(VFIOError, match="failed to find romfile"):
        VFIOPCIDevice.realize(tspace, tspace.machine, host=TEST, romfile=str(tmp_path / "missing.rom"))
    assert tspace.groups == {}


# -- INTx -------------------------------------------------------------------------------------------
def raise_intx(dev, machine):
    dev.bar_write(0, RAISE, 1, 4)
    assert poll_until(machine, lambda: dev.intx.pending)


def test_intx_asserts_the_line_and_a_bar_access_is_the_eoi(edu, kernel, space):
    line = edu.intx.line
    assert edu.interrupt == "intx" and line.name == "0000:00:03.0 INTA" and not line.level
    raise_intx(edu, space.machine)
    assert line.level and not edu.mmap_enabled(0) and kernel.vfio_devices[EDU].intx_masked
    with TraceRecorder() as tr:
        edu.bar_write(0, ACK, 1, 4)
    assert not edu.intx.pending and not line.level and line.history == [True, False]
    assert not kernel.vfio_devices[EDU].intx_masked, "the EOI did not UNMASK"
    assert [e for e, _ in tr.events if e in ("vfio_intx_eoi", "vfio_region_write")] == [
        "vfio_region_write", "vfio_intx_eoi"]


def test_an_eoi_with_the_device_still_asserting_fires_again(edu, space):
    raise_intx(edu, space.machine)
    assert edu.bar_read(0, 0, 4) == 0x010000ED
    assert not edu.intx.pending
    assert poll_until(space.machine, lambda: edu.intx.pending), "UNMASK of a still-high line did not re-fire"
    assert edu.intx.line.raised == 2


def test_the_mmap_timer_brings_the_fast_path_back(edu, space, clock):
    assert edu.mmap_enabled()
    raise_intx(edu, space.machine)
    assert not edu.mmap_enabled()
    edu.bar_write(0, ACK, 1, 4)
    clock.advance(1099)
    assert not edu.mmap_enabled()
    clock.advance(1)
    assert edu.mmap_enabled()


def test_the_mmap_timer_rearms_while_pending(edu, space, clock):
    raise_intx(edu, space.machine)
    clock.advance(1100)
    assert not edu.mmap_enabled() and edu.intx.mmap_timer.deadline == 2200
    clock.advance(400)
    edu.bar_write(0, ACK, 1, 4)
    clock.advance(699)
    assert not edu.mmap_enabled()
    clock.advance(1)
    assert edu.mmap_enabled()


def test_each_interrupt_pushes_the_timer_out(edu, space, clock):
    raise_intx(edu, space.machine)
    edu.bar_write(0, ACK, 1, 4)
    clock.advance(600)
    edu.bar_write(0, RAISE, 1, 4)
    assert poll_until(space.machine, lambda: edu.intx.pending)
    edu.bar_write(0, ACK, 1, 4)
    clock.advance(1099)
    assert not edu.mmap_enabled()
    clock.advance(1)
    assert edu.mmap_enabled()


def test_a_zero_timeout_keeps_the_mmaps_off(space, clock):
    with VFIOPCIDevice.realize(space, space.machine, host=EDU, x_intx_mmap_timeout_ms=0,
                               x_kvm_intx=False) as dev:
        raise_intx(dev, space.machine)
        dev.bar_write(0, ACK, 1, 4)
        clock.advance(100_000)
        assert not dev.mmap_enabled() and dev.intx.mmap_timer.deadline is None


@pytest.fixture
def kvm(kernel, clock):
    """A machine that plays KVM's irqfd, its address space, and edu realized on it, decoding."""
    with AddressSpace(kernel, Machine(clock, irqfd=True)) as s, VFIOPCIDevice.realize(s, s.machine, host=EDU) as dev:
        dev.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY, 2)
        yield dev


def test_without_irqfd_intx_stays_in_user_space_whatever_x_kvm_intx_says(space):
    with VFIOPCIDevice.realize(space, space.machine, host=EDU) as dev:
        assert not dev.intx.kvm_accel and dev.intx.unmask == -1 and not space.machine.irqfds
        assert space.machine.has_fd_handler(dev.intx.interrupt)


def test_kvm_intx_hands_the_trigger_to_the_irqfd_and_the_resample_fd_to_vfio(kvm, kernel):
    """vfio_enable_intx_kvm: KVM asserts the line and takes the EOI; no interrupt reaches the
    device's code, so the BAR mmaps stay on and a BAR access ends nothing."""
    machine, intx = kvm.space.machine, kvm.intx
    assert intx.kvm_accel and machine.irqfds[intx.interrupt].resample == intx.unmask >= 0
    assert machine.irqfds[intx.interrupt].gsi is intx.line and not machine.has_fd_handler(intx.interrupt)
    unmasks = []
    kvm.vbasedev.unmask_irq = lambda index: unmasks.append(index)
    kvm.bar_write(0, RAISE, 1, 4)
    assert poll_until(machine, lambda: intx.line.level), "KVM's irqfd did not assert the line"
    assert not intx.pending and kvm.mmap_enabled() and not intx.mmap_timer.pending
    assert kernel.vfio_devices[EDU].intx_masked
    kvm.bar_write(0, ACK, 1, 4)
    kvm.bar_read(0, STATUS, 4)
    assert intx.line.level and intx.line.history == [True], "a BAR access was taken for the EOI"
    assert machine.eoi(intx.line.name) and not intx.line.level
    assert poll_until(machine, lambda: not kernel.vfio_devices[EDU].intx_masked), "the resample did not unmask"
    assert unmasks == [], "the EOI went through the UNMASK ioctl"
    kvm.bar_write(0, RAISE, 1, 4)
    assert poll_until(machine, lambda: intx.line.history == [True, False, True])
    kvm.bar_write(0, ACK, 1, 4)
    machine.eoi(intx.line.name)


def test_x_kvm_intx_off_keeps_intx_in_user_space_on_an_irqfd_machine(kernel, clock):
    with AddressSpace(kernel, Machine(clock, irqfd=True)) as s, \
            VFIOPCIDevice.realize(s, s.machine, host=EDU, x_kvm_intx=False) as dev:
        assert not dev.intx.kvm_accel and not s.machine.irqfds and s.machine.has_fd_handler(dev.intx.interrupt)


KVM_INTX_FAILURES = [
    ("resample eventfd", Fault("eventfd", nth=2, errno=errno.EMFILE), "vfio: Error: event_notifier_init failed eoi"),
    ("unmask eventfd", Fault("ioctl", request="VFIO_DEVICE_SET_IRQS", errno=errno.EIO,
                             when=lambda call: "UNMASK EVENTFD" in call.name),
     "vfio: Error: Failed to setup INTx unmask fd: Input/output error"),
]


@pytest.mark.parametrize("fault,message", [f[1:] for f in KVM_INTX_FAILURES], ids=[f[0] for f in KVM_INTX_FAILURES])
def test_a_failing_kvm_intx_step_leaves_intx_in_user_space(kernel, clock, fault, message):
    """vfio_enable_intx_kvm's unwinding: the irqfd removed, the resample eventfd closed, the
    handler back and INTx unmasked, each failure reported."""
    with AddressSpace(kernel, Machine(clock, irqfd=True)) as space, TraceRecorder() as tr, \
            kernel.faults.inject(fault) as (rule,), VFIOPCIDevice.realize(space, space.machine, host=EDU) as dev:
        machine = space.machine
        assert rule.hits == 1 and message in [f["message"] for f in tr.named("error")]
        assert not dev.intx.kvm_accel and dev.intx.unmask == -1 and not machine.irqfds
        assert dev.vbasedev.eventfds == {dev.intx.interrupt} and machine.has_fd_handler(dev.intx.interrupt)
        assert not kernel.vfio_devices[EDU].intx_masked
        dev.vbasedev.trigger_irq(INTX)
        assert poll_until(machine, lambda: dev.intx.pending), "INTx did not come back to user space"


def test_an_irqfd_kvm_refuses_is_reported_and_intx_stays_in_user_space(kernel, clock, monkeypatch):
    machine = Machine(clock, irqfd=True)

    def refuse(*args):
        raise OSError(errno.ENOSPC, "no irqfd slots")
    monkeypatch.setattr(machine, "add_irqfd", refuse)
    with AddressSpace(kernel, machine) as space, TraceRecorder() as tr, \
            VFIOPCIDevice.realize(space, machine, host=EDU) as dev:
        assert "vfio: Error: Failed to setup resample irqfd: No space left on device" in [
            f["message"] for f in tr.named("error")]
        assert not dev.intx.kvm_accel and dev.intx.unmask == -1 and machine.has_fd_handler(dev.intx.interrupt)
    machine.close()


def test_a_route_change_tears_down_and_rebuilds_the_kvm_path(kvm):
    machine, intx = kvm.space.machine, kvm.intx
    kvm.bar_write(0, RAISE, 1, 4)
    assert poll_until(machine, lambda: intx.line.level)
    old = intx.line
    with TraceRecorder() as tr:
        kvm.update_irq("gsi 11")
    assert not old.level and intx.line is machine.irq_line("gsi 11") and intx.kvm_accel
    assert machine.irqfds[intx.interrupt].gsi is intx.line
    assert [e for e, _ in tr.events if e.startswith("vfio_intx_") and "kvm" in e] == [
        "vfio_intx_disable_kvm", "vfio_intx_enable_kvm"]
    assert poll_until(machine, lambda: intx.line.level), "the still-high line was lost"
    kvm.update_irq(None)
    assert not intx.kvm_accel and not machine.irqfds and intx.line is machine.irq_line("gsi 11")
    assert poll_until(machine, lambda: intx.pending), "user space did not take the still-high line"
    kvm.bar_write(0, ACK, 1, 4)
    assert not intx.pending and not intx.line.level


def test_leaving_intx_for_msi_lets_go_of_the_irqfd(kvm):
    machine = kvm.space.machine
    enable_msi(kvm)
    assert kvm.interrupt == "msi" and not kvm.intx.kvm_accel
    assert all(irqfd.gsi != kvm.intx.line for irqfd in machine.irqfds.values())
    kvm.config_write(kvm.msi_cap + 2, 0, 2)
    assert kvm.intx.kvm_accel and machine.irqfds[kvm.intx.interrupt].gsi is kvm.intx.line


def test_an_irq_line_name_can_be_given(space):
    with VFIOPCIDevice.realize(space, space.machine, host=EDU, irq_line="gsi 10") as dev:
        assert dev.intx.line is space.machine.irq_line("gsi 10")


# -- MSI --------------------------------------------------------------------------------------------
def enable_msi(dev, address=0xFEE01000, data=0x4041, qsize=0):
    pos = dev.msi_cap
    dev.config_write(pos + 4, address, 4)
    dev.config_write(pos + 12, data, 2)
    dev.config_write(pos + 2, 1 | (qsize << 4), 2)


def test_msi_is_enabled_by_the_guests_config_write(edu, kernel, space):
    edu.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
    with TraceRecorder() as tr:
        enable_msi(edu)
    assert edu.interrupt == "msi" and tr.named("vfio_intx_disable")
    (vector,) = edu.msi_vectors
    assert vector.use and vector.fd >= 0 and vector.msg == (0xFEE01000, 0x4041)
    assert kernel.vfio_devices[EDU].irq_type == MSI
    edu.bar_write(0, RAISE, 1, 4)
    assert poll_until(space.machine, lambda: space.machine.msi_messages)
    assert space.machine.msi_messages == [(0xFEE01000, 0x4041)]
    assert not edu.intx.line.level


def test_disabling_msi_returns_to_intx(edu, kernel, space):
    before = len(open_fds())
    enable_msi(edu)
    fd = edu.msi_vectors[0].fd
    edu.config_write(edu.msi_cap + 2, 0, 2)
    assert edu.interrupt == "intx" and edu.msi_vectors == [] and kernel.vfio_devices[EDU].irq_type == INTX
    assert edu.vbasedev.eventfds == {edu.intx.interrupt} and len(open_fds()) == before
    assert fd == edu.intx.interrupt or not space.machine.has_fd_handler(fd)


def test_fewer_msi_vectors_granted_means_a_retry_with_that_many(tkernel, tspace):
    asked = []

    def instead(name, args):
        if set_irqs(MSI)(name, args) and uapi.vfio_irq_set.unpack(bytes(args[2])).count:
            asked.append(uapi.vfio_irq_set.unpack(bytes(args[2])).count)
            return 2 if asked == [4] else None
        return None
    space = AddressSpace(FaultyHost(tkernel, instead=instead), tspace.machine)
    with TraceRecorder() as tr, VFIOPCIDevice.realize(space, space.machine, host=TEST) as dev:
        enable_msi(dev, qsize=2)
        assert asked == [4, 2] and dev.interrupt == "msi" and dev.nr_vectors == 2
        assert dev.vbasedev.eventfds == {v.fd for v in dev.msi_vectors} and len(dev.msi_vectors) == 2
        assert len(tkernel.vfio_devices[TEST].msi_ctx) == 2
    assert "vfio: Error: Failed to enable 4 MSI vectors, retry with 2" in [f["message"] for f in tr.named("error")]


def test_a_failed_msi_setup_leaves_interrupts_off(tkernel, tspace):
    space = AddressSpace(FaultyHost(tkernel, fail=failing(set_irqs(MSI, uapi.VFIO_IRQ_SET_DATA_EVENTFD))),
                         tspace.machine)
    with TraceRecorder() as tr, VFIOPCIDevice.realize(space, space.machine, host=TEST) as dev:
        enable_msi(dev, qsize=2)
        assert dev.interrupt == "none" and dev.nr_vectors == 0 and dev.vbasedev.eventfds == set()
        assert tkernel.vfio_devices[TEST].irq_type == -1
    assert "vfio: Error: Failed to setup MSI fds: Input/output error" in [f["message"] for f in tr.named("error")]


def test_a_masked_msi_vector_is_held_pending_until_unmasked(tdev, tspace):
    machine = tspace.machine
    enable_msi(tdev, qsize=2)
    mask = tdev.msi_cap + 16
    tdev.config_write(mask, 0b0010, 4)
    tdev.vbasedev.trigger_irq(MSI, 1)
    assert poll_until(machine, lambda: tdev.config_read(mask + 4, 4) == 0b0010)
    assert machine.msi_messages == []
    tdev.config_write(mask, 0, 4)
    assert machine.msi_messages == [(0xFEE01000, 0x4041)] and tdev.config_read(mask + 4, 4) == 0


def test_msi_vector_data_carries_the_vector_number(tdev, tspace):
    enable_msi(tdev, data=0x4040, qsize=2)
    tdev.vbasedev.trigger_irq(MSI, 3)
    assert poll_until(tspace.machine, lambda: tspace.machine.msi_messages)
    assert tspace.machine.msi_messages == [(0xFEE01000, 0x4043)]


# -- MSI-X ------------------------------------------------------------------------------------------
def msix_control(dev, value):
    dev.config_write(0x72, value, 2)


def program_vector(dev, nr, address, data, masked=False):
    base = 0x3000 + 16 * nr
    dev.bar_write(2, base, address, 4)
    dev.bar_write(2, base + 4, 0, 4)
    dev.bar_write(2, base + 8, data, 4)
    dev.bar_write(2, base + 12, int(masked), 4)


def test_msix_enable_leaves_the_device_in_msix_mode_with_no_vectors(tdev, tkernel):
    with TraceRecorder() as tr:
        msix_control(tdev, 0x8000)
    assert tdev.interrupt == "msix" and tdev.nr_vectors == 1
    assert [e for e, _ in tr.events if e.startswith("vfio_msix_vector")] == [
        "vfio_msix_vector_do_use", "vfio_msix_vector_release"]
    assert all(not v.use and v.fd == -1 for v in tdev.msix_vectors)
    kdev = tkernel.vfio_devices[TEST]
    assert kdev.irq_type == MSIX and [c.trigger for c in kdev.msi_ctx] == [None]


def test_msix_vectors_grow_one_index_at_a_time(tdev, tkernel, tspace):
    msix_control(tdev, 0x8000)
    program_vector(tdev, 3, 0xFEE00000, 0x55)
    vector = tdev.msix_vectors[3]
    assert vector.use and vector.fd >= 0 and vector.msg == (0xFEE00000, 0x55) and tdev.nr_vectors == 4
    kdev = tkernel.vfio_devices[TEST]
    assert len(kdev.msi_ctx) == 4 and [c.trigger is not None for c in kdev.msi_ctx] == [False] * 3 + [True]
    program_vector(tdev, 1, 0xFEE00000, 0x51)
    assert tdev.nr_vectors == 4 and kdev.msi_ctx[1].trigger is not None
    tdev.vbasedev.trigger_irq(MSIX, 3)
    assert poll_until(tspace.machine, lambda: tspace.machine.msi_messages)
    assert tspace.machine.msi_messages == [(0xFEE00000, 0x55)]


def test_masking_an_msix_vector_releases_it(tdev, tkernel):
    msix_control(tdev, 0x8000)
    program_vector(tdev, 2, 0xFEE00000, 0x52)
    assert tdev.vbasedev.eventfds == {tdev.msix_vectors[2].fd}
    tdev.bar_write(2, 0x3000 + 2 * 16 + 12, 1, 4)
    assert not tdev.msix_vectors[2].use and tdev.msix_vectors[2].fd == -1
    assert tkernel.vfio_devices[TEST].msi_ctx[2].trigger is None and tdev.vbasedev.eventfds == set()


def test_an_interrupt_signalled_before_the_mask_goes_with_the_released_vector(tdev, tspace):
    """The seed's release unuses the vector and closes its eventfd, so an interrupt the kernel had
    already signalled is dropped, not held in the emulated PBA for the unmask: the PBA's pending
    delivery is msix.c's for ivshmem, and never a vfio-pci vector's."""
    msix_control(tdev, 0x8000)
    program_vector(tdev, 2, 0xFEE00000, 0x52)
    tdev.vbasedev.trigger_irq(MSIX, 2)
    tdev.bar_write(2, 0x3000 + 2 * 16 + 12, 1, 4)
    assert not tdev.msix_is_pending(2) and tdev.bar_read(2, 0x3800, 4) == 0
    tdev.bar_write(2, 0x3000 + 2 * 16 + 12, 0, 4)
    assert not poll_until(tspace.machine, lambda: tspace.machine.msi_messages, 0.1)
    tdev.vbasedev.trigger_irq(MSIX, 2)
    assert poll_until(tspace.machine, lambda: tspace.machine.msi_messages == [(0xFEE00000, 0x52)])


def test_maskall_releases_and_unmasking_uses_again(tdev):
    msix_control(tdev, 0x8000)
    program_vector(tdev, 0, 0xFEE00000, 0x50)
    msix_control(tdev, 0xC000)
    assert not tdev.msix_vectors[0].use
    msix_control(tdev, 0x8000)
    assert tdev.msix_vectors[0].use


def test_vectors_unmasked_before_enable_are_used_on_enable(tdev):
    program_vector(tdev, 1, 0xFEE00000, 0x51)
    msix_control(tdev, 0x8000)
    assert tdev.msix_vectors[1].use and tdev.nr_vectors == 2


def test_disabling_msix_tears_everything_down_and_returns_to_intx(tdev, tkernel, tspace):
    intx_fds = open_fds()
    msix_control(tdev, 0x8000)
    program_vector(tdev, 0, 0xFEE00000, 0x50)
    program_vector(tdev, 5, 0xFEE00000, 0x55)
    msix_control(tdev, 0)
    assert tdev.interrupt == "intx" and tdev.msix_vectors == [] and tdev.nr_vectors == 0
    assert tkernel.vfio_devices[TEST].irq_type == INTX
    assert len(open_fds()) == len(intx_fds) and tdev.vbasedev.eventfds == {tdev.intx.interrupt}
    tdev.vbasedev.trigger_irq(INTX)
    assert poll_until(tspace.machine, lambda: tdev.intx.pending)


@pytest.fixture
def kvm_tdev(tkernel, clock):
    """The test function on a machine that plays KVM's irqfd and MSI routes."""
    with AddressSpace(tkernel, Machine(clock, irqfd=True)) as s, VFIOPCIDevice.realize(s, s.machine, host=TEST) as dev:
        dev.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
        yield dev


def msi_routes(machine):
    """Each irqfd's eventfd and the message its route sends."""
    return {fd: (i.gsi.address, i.gsi.data) for fd, i in machine.irqfds.items() if isinstance(i.gsi, MSIRoute)}


def test_msi_vectors_are_routed_to_kvm_where_the_machine_offers_irqfd(kvm_tdev):
    """vfio_enable_msi's KVM path: each vector's eventfd is an irqfd on a route to its message,
    so an interrupt reaches the guest with no handler of the device in between."""
    machine = kvm_tdev.space.machine
    enable_msi(kvm_tdev, data=0x4040, qsize=2)
    vectors = kvm_tdev.msi_vectors
    assert msi_routes(machine) == {v.fd: (0xFEE01000, 0x4040 | v.nr) for v in vectors} and len(vectors) == 4
    assert not any(machine.has_fd_handler(v.fd) for v in vectors)
    kvm_tdev.vbasedev.trigger_irq(MSI, 2)
    assert poll_until(machine, lambda: machine.msi_messages == [(0xFEE01000, 0x4042)])
    kvm_tdev.config_write(kvm_tdev.msi_cap + 2, 0, 2)
    assert not machine.msi_routes and list(machine.irqfds) == [kvm_tdev.intx.interrupt]


def test_msix_vectors_are_routed_to_kvm_and_masking_releases_the_route(kvm_tdev):
    machine = kvm_tdev.space.machine
    msix_control(kvm_tdev, 0x8000)
    assert not machine.msi_routes, "the vector MSI-X enable uses and releases has no message to route"
    program_vector(kvm_tdev, 1, 0xFEE00000, 0x51)
    vector = kvm_tdev.msix_vectors[1]
    assert vector.virq is not None and msi_routes(machine) == {vector.fd: (0xFEE00000, 0x51)}
    assert not machine.has_fd_handler(vector.fd)
    kvm_tdev.vbasedev.trigger_irq(MSIX, 1)
    assert poll_until(machine, lambda: machine.msi_messages == [(0xFEE00000, 0x51)])
    program_vector(kvm_tdev, 1, 0xFEE00000, 0x51, masked=True)
    assert vector.virq is None and not machine.msi_routes and vector.fd == -1
    program_vector(kvm_tdev, 1, 0xFEE00000, 0x61)
    assert msi_routes(machine) == {vector.fd: (0xFEE00000, 0x61)}
    msix_control(kvm_tdev, 0)
    assert not machine.msi_routes and kvm_tdev.intx.kvm_accel


def test_exit_with_msi_on_leaves_kvm_nothing(tkernel, clock):
    """Leaving MSI brings INTx back, and on this machine its irqfd: exit lets go of that too."""
    machine = Machine(clock, irqfd=True)
    with AddressSpace(tkernel, machine) as space:
        dev = VFIOPCIDevice.realize(space, machine, host=TEST)
        enable_msi(dev, qsize=2)
        dev.exit()
        assert not machine.irqfds and not machine.msi_routes and not machine.fd_handlers
    machine.close()


def test_a_route_or_irqfd_kvm_refuses_leaves_the_vector_in_user_space(kvm_tdev, monkeypatch):
    machine = kvm_tdev.space.machine

    def refuse(*args):
        raise OSError(errno.ENOSPC, "no irqfd slots")
    monkeypatch.setattr(machine, "add_irqfd", refuse)
    enable_msi(kvm_tdev, qsize=1)
    assert not machine.msi_routes and all(v.virq is None and machine.has_fd_handler(v.fd)
                                          for v in kvm_tdev.msi_vectors)
    kvm_tdev.vbasedev.trigger_irq(MSI, 1)
    assert poll_until(machine, lambda: machine.msi_messages == [(0xFEE01000, 0x4041)])


# -- reset and hot reset ----------------------------------------------------------------------------
def test_reset_disables_interrupts_clears_command_resets_and_reenables_intx(tdev, tkernel):
    enable_msi(tdev)
    tdev.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER | fpci.PCI_COMMAND_IO, 2)
    with TraceRecorder() as tr:
        tdev.reset()
    assert tr.named("vfio_pci_reset") and tr.named("vfio_msi_disable")
    assert tkernel.vfio_devices[TEST].resets == 1
    assert tkernel.functions[TEST].command() & 0x407 == 0
    assert tdev.interrupt == "intx"


def test_reset_without_a_reset_method_skips_the_ioctl(edu, kernel):
    calls = []
    edu.vbasedev.reset = lambda: calls.append("reset")
    edu.reset()
    assert calls == [] and edu.interrupt == "intx"


def test_hot_reset_info_lists_the_bus(tdev):
    assert tdev.hot_reset_info() == [(7, 0, 1, 0)]


def test_hot_reset_info_on_the_root_bus_has_no_mechanism(edu):
    with pytest.raises(VFIOError, match="Cannot reset device 0000:00:03.0, no available reset mechanism") as exc:
        edu.hot_reset_info()
    assert exc.value.errno == errno.ENODEV


# -- DMA listener -----------------------------------------------------------------------------------
def test_the_listener_maps_page_aligned_ram_read_only_where_asked(edu, space):
    container = edu.vbasedev.group.container
    machine = space.machine
    ram = machine.add_ram(0x200000, 4 * PAGE)
    rom = machine.add_ram(0x300000, PAGE, readonly=True)
    assert container.mappings == {0x200000: 4 * PAGE, 0x300000: PAGE}
    edu.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
    edu_dma(edu, 0x40000, 0x300000, 4, to_ram=True)
    iommu = next(f for f in space.host.files.values() if f.kind == "container").iommu
    assert iommu.faults[-1].reason == "write to a read-only mapping"
    machine.remove_ram(ram)
    machine.remove_ram(rom)
    assert container.mappings == {}


def test_a_section_the_listener_rejects_is_reported_and_the_next_device_still_starts(edu, space):
    """One unaligned section used to fail every later container set-up on the machine."""
    with TraceRecorder() as tr:
        unaligned = space.machine.add_ram(0x200800, PAGE)
        space.machine.add_ram(0x300000, PAGE)
    assert [f["message"] for f in tr.named("error")] == ["vfio_listener_region_add received unaligned region"]
    assert edu.vbasedev.group.container.mappings == {0x300000: PAGE}
    with TraceRecorder() as tr:
        space.machine.remove_ram(unaligned)
    assert [f["message"] for f in tr.named("error")] == ["vfio_listener_region_del received unaligned region"]
    edu.exit()
    with VFIOPCIDevice.realize(space, space.machine, host=EDU) as dev:
        assert dev.vbasedev.group.container.mappings == {0x300000: PAGE}


def test_a_refused_unmap_is_reported_and_the_ram_still_removed(edu, space, kernel):
    ram = space.machine.add_ram(0x200000, 2 * PAGE)
    with kernel.faults.inject("ioctl:VFIO_IOMMU_UNMAP_DMA,errno=EIO"), TraceRecorder() as tr:
        space.machine.remove_ram(ram)
    assert [f["message"] for f in tr.named("error")] == [
        f"vfio_dma_unmap({0x200000:#x}, {2 * PAGE:#x}) = -5 (Input/output error)"]
    assert space.machine.ram == []


def test_an_ebusy_map_is_unmapped_and_retried(kernel, clock):
    state = {"ebusy": 1}

    def fail(name, args):
        if ioctl_is(uapi.VFIO_IOMMU_MAP_DMA)(name, args) and state["ebusy"]:
            state["ebusy"] = 0
            return errno.EBUSY
        return 0
    with AddressSpace(FaultyHost(kernel, fail), Machine(clock)) as space, TraceRecorder() as tr:
        with VFIOPCIDevice.realize(space, space.machine, host=EDU) as dev:
            space.machine.add_ram(0x200000, PAGE)
            assert dev.vbasedev.group.container.mappings == {0x200000: PAGE}
        assert tr.named("vfio_dma_map_ebusy_retry")


# -- acceptance: the guest's view ---------------------------------------------------------------------
def edu_dma(dev, src, dst, count, to_ram):
    for reg, value in ((0x80, src), (0x88, dst), (0x90, count), (0x98, 1 | (2 if to_ram else 0))):
        dev.bar_write(0, reg, value, 4)
    while dev.bar_read(0, 0x98, 4) & 1:
        pass


def test_acceptance_edu_factorial(edu):
    edu.bar_write(0, FACT, 10, 4)
    while edu.bar_read(0, STATUS, 4) & 1:
        pass
    assert edu.bar_read(0, FACT, 4) == 3628800
    edu.bar_write(0, 0x04, 0x12345678, 4)
    assert edu.bar_read(0, 0x04, 4) == 0xEDCBA987


def test_acceptance_edu_dma_round_trip_through_guest_ram(edu, space):
    ram = space.machine.add_ram(0x200000, 4 * PAGE)
    edu.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
    pattern = bytes(range(256)) * 2
    ram.memory[0:512] = pattern
    edu_dma(edu, 0x200000, 0x40000, 512, to_ram=False)
    edu_dma(edu, 0x40000, 0x201000, 512, to_ram=True)
    assert ram.memory[PAGE:PAGE + 512] == pattern


def test_acceptance_intx_msi_and_the_mmap_timer_on_the_virtual_clock(space, clock):
    machine = space.machine
    with VFIOPCIDevice.realize(space, machine, host=EDU) as dev:
        raise_intx(dev, machine)
        assert dev.intx.line.level and not dev.mmap_enabled()
        dev.bar_write(0, ACK, 1, 4)
        assert not dev.intx.line.level
        clock.advance(1100)
        assert dev.mmap_enabled()
        dev.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
        enable_msi(dev)
        dev.bar_write(0, RAISE, 1, 4)
        assert poll_until(machine, lambda: machine.msi_messages == [(0xFEE01000, 0x4041)])


@pytest.mark.skipif("e1000e" not in devices.CATALOG, reason="the fake kernel has no e1000e model yet")
def test_acceptance_e1000e_msix_vector_raised_by_the_device_reaches_the_machine(clock):
    """MSI-X enabled through config, vector 0 programmed and unmasked in the emulated table, then
    the NIC raises RXQ0 through ICS with IVAR routing it to vector 0."""
    ivar, ims, ics, rxq0 = 0xE4, 0xD0, 0xC8, 0x00100000
    with (fake_kernel("vm") as k,
          AddressSpace(k, Machine(clock)) as space):
        with VFIOPCIDevice.realize(space, space.machine, host="0000:01:00.0") as dev:
            dev.config_write(fpci.PCI_COMMAND, fpci.PCI_COMMAND_MEMORY | fpci.PCI_COMMAND_MASTER, 2)
            dev.config_write(dev.msix.cap + 2, 0x8000, 2)
            assert dev.interrupt == "msix" and dev.nr_vectors == 1
            table, bar = dev.msix.table_offset, dev.msix.table_bar
            for off, value in ((0, 0xFEE00000), (4, 0), (8, 0x4060), (12, 0)):
                dev.bar_write(bar, table + off, value, 4)
            assert dev.msix_vectors[0].use
            dev.bar_write(0, ivar, 0x8, 4)
            dev.bar_write(0, ims, rxq0, 4)
            dev.bar_write(0, ics, rxq0, 4)
            assert poll_until(space.machine, lambda: space.machine.msi_messages)
            assert space.machine.msi_messages == [(0xFEE00000, 0x4060)]
