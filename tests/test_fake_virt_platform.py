"""The arm64 runner's virt board in the fake kernel, through the Host API only: the PL031 and PL061
on vfio-amba, the empty virtio-mmio slot on vfio-platform, each in a no-IOMMU group, and the
container rules of no-IOMMU mode."""

import errno
import struct
import time

import pytest

from conformance.raw import RawSession, errno_of, wait_for
from fakekernel import FakeKernel
from fakekernel.devices import pl031, pl061, virtio_mmio as vm
from fakekernel.profile import PROFILES
from vfio_impl import uapi

RTC, GPIO, SLOT, IDLE_SLOT = "9010000.pl031", "9030000.pl061", "a000000.virtio_mmio", "a000200.virtio_mmio"
GROUPS = {RTC: 0, GPIO: 1, SLOT: 2}
TEST_DEVICE, TEST_GROUP = "c0000000.platform-test", 20
NOIOMMU, TYPE1V2 = uapi.VFIO_NOIOMMU_IOMMU, uapi.VFIO_TYPE1v2_IOMMU
RW = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
LEVEL = uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
NONE, BOOL, EVENTFD = uapi.VFIO_IRQ_SET_DATA_NONE, uapi.VFIO_IRQ_SET_DATA_BOOL, uapi.VFIO_IRQ_SET_DATA_EVENTFD
MASK, UNMASK, TRIGGER = uapi.VFIO_IRQ_SET_ACTION_MASK, uapi.VFIO_IRQ_SET_ACTION_UNMASK, uapi.VFIO_IRQ_SET_ACTION_TRIGGER


# The no-IOMMU rules are the same on both kernels: the container tests run on each profile.
BOTH_KERNELS = pytest.mark.parametrize("k", list(PROFILES), indirect=True)


@pytest.fixture
def k(request):
    with FakeKernel("platform", getattr(request, "param", None)) as kernel:
        yield kernel


@pytest.fixture
def s(k):
    session = RawSession(k, None)
    yield session
    session.close()


def group(k, s, number):
    return s.track(k.open(k.groups[number].node))


def attached(k, s, *numbers, iommu=NOIOMMU):
    """A container holding the groups, with `iommu` set on it (None: no IOMMU yet); its fd and the groups'."""
    c = s.container()
    gs = [group(k, s, n) for n in numbers]
    for g in gs:
        s.set_container(g, c)
    if iommu is not None:
        k.ioctl(c, uapi.VFIO_SET_IOMMU, iommu)
    return c, gs


def device(k, s, name):
    _, (g,) = attached(k, s, GROUPS[name])
    return s.device(g, name)


def check_extension(k, c, ext):
    return k.ioctl(c, uapi.VFIO_CHECK_EXTENSION, ext)


def device_flags(k, fd):
    buf = uapi.vfio_device_info.pack(argsz=uapi.vfio_device_info.size)
    k.ioctl(fd, uapi.VFIO_DEVICE_GET_INFO, buf)
    info = uapi.vfio_device_info.unpack(buf)
    return info.flags, info.num_regions, info.num_irqs


def set_irqs(k, fd, flags, data=b""):
    head = uapi.vfio_irq_set.pack(argsz=uapi.vfio_irq_set.size + len(data), flags=flags, index=0, start=0, count=1)
    return k.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(head) + data))


def trigger(k, s, fd):
    efd = s.eventfd()
    set_irqs(k, fd, EVENTFD | TRIGGER, struct.pack("=i", efd))
    return efd


# -- sysfs and /dev/vfio ----------------------------------------------------------------------------------
def test_amba_devices_live_under_the_platform_root(k):
    for name in (RTC, GPIO):
        dev = f"/sys/bus/amba/devices/{name}"
        assert k.readlink(dev) == f"../../../devices/platform/{name}"
        assert k.readlink(f"{dev}/driver") == "../../../bus/amba/drivers/vfio-amba"
        assert not k.exists(f"/sys/bus/platform/devices/{name}")
    assert k.listdir("/sys/bus/amba/drivers/vfio-amba") == [RTC, GPIO, "bind", "unbind"]
    assert k.read_text(f"/sys/bus/amba/devices/{RTC}/id") == "00141031\n"
    assert k.read_text(f"/sys/bus/amba/devices/{GPIO}/id") == "00041061\n"
    assert k.read_text(f"/sys/bus/amba/devices/{RTC}/of_node/compatible") == "arm,pl031\0arm,primecell\0"
    assert k.read_text(f"/sys/bus/amba/devices/{GPIO}/of_node/name") == "pl061\0"


def test_virtio_mmio_slots_on_the_platform_bus(k):
    dev = f"/sys/bus/platform/devices/{SLOT}"
    assert k.readlink(f"{dev}/driver") == "../../../bus/platform/drivers/vfio-platform"
    assert k.read_text(f"{dev}/of_node/compatible") == "virtio,mmio\0"
    assert k.read_text(f"{dev}/of_node/name") == "virtio_mmio\0"
    idle = f"/sys/bus/platform/devices/{IDLE_SLOT}"
    assert k.readlink(f"{idle}/driver") == "../../../bus/platform/drivers/virtio-mmio"
    assert not k.exists(f"{idle}/iommu_group"), "no-IOMMU mode makes a group only for a device bound to VFIO"


@BOTH_KERNELS
def test_noiommu_groups(k):
    for name, number in GROUPS.items():
        bus = "amba" if name != SLOT else "platform"
        assert k.readlink(f"/sys/bus/{bus}/devices/{name}/iommu_group") == f"../../../kernel/iommu_groups/{number}"
        assert k.listdir(f"/sys/kernel/iommu_groups/{number}/devices") == [name]
        assert k.read_text(f"/sys/kernel/iommu_groups/{number}/name") == "vfio-noiommu\n"
        assert k.groups[number].node == f"/dev/vfio/noiommu-{number}"
        assert errno_of(k.open, f"/dev/vfio/{number}") == errno.ENOENT
    assert k.read_text("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode") == "Y\n"
    assert k.read_text("/sys/module/vfio_platform/parameters/reset_required") == "N\n"
    assert k.groups[TEST_GROUP].node == f"/dev/vfio/{TEST_GROUP}"
    assert errno_of(k.open, f"/dev/vfio/noiommu-{TEST_GROUP}") == errno.ENOENT


def test_a_kernel_without_noiommu_mode():
    with FakeKernel() as k:
        c = k.open("/dev/vfio/vfio")
        assert check_extension(k, c, NOIOMMU) == 0
        assert not k.exists("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
        assert not k.topology.enable_unsafe_noiommu_mode


# -- the container in no-IOMMU mode -------------------------------------------------------------------------
@BOTH_KERNELS
def test_an_empty_container_polls_both_drivers(k, s):
    c = s.container()
    assert check_extension(k, c, NOIOMMU) == 1 and check_extension(k, c, TYPE1V2) == 1
    assert errno_of(k.ioctl, c, uapi.VFIO_SET_IOMMU, NOIOMMU) == errno.EINVAL, "no group yet"


@BOTH_KERNELS
def test_a_noiommu_container_uses_only_vfio_noiommu(k, s):
    c, (g,) = attached(k, s, 0, iommu=None)
    status = uapi.vfio_group_status.pack(argsz=uapi.vfio_group_status.size)
    k.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, status)
    assert uapi.vfio_group_status.unpack(status).flags == uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert check_extension(k, c, NOIOMMU) == 1 and check_extension(k, c, TYPE1V2) == 0
    assert errno_of(k.ioctl, c, uapi.VFIO_IOMMU_GET_INFO, bytearray(uapi.vfio_iommu_type1_info.size)) == errno.EINVAL
    assert errno_of(s.device, g, RTC) == errno.EINVAL, "GET_DEVICE_FD waits for an IOMMU driver"
    for other in (TYPE1V2, uapi.VFIO_TYPE1_IOMMU):
        assert errno_of(k.ioctl, c, uapi.VFIO_SET_IOMMU, other) == errno.ENODEV
    assert k.ioctl(c, uapi.VFIO_SET_IOMMU, NOIOMMU) == 0
    assert errno_of(k.ioctl, c, uapi.VFIO_SET_IOMMU, NOIOMMU) == errno.EINVAL, "already set"
    assert check_extension(k, c, NOIOMMU) == 1 and check_extension(k, c, TYPE1V2) == 0
    for request, size in ((uapi.VFIO_IOMMU_GET_INFO, uapi.vfio_iommu_type1_info.size),
                          (uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map.size),
                          (uapi.VFIO_IOMMU_UNMAP_DMA, uapi.vfio_iommu_type1_dma_unmap.size)):
        assert errno_of(k.ioctl, c, request, bytearray(size)) == errno.ENOTTY
    assert device_flags(k, s.device(g, RTC))[0] == uapi.VFIO_DEVICE_FLAGS_AMBA


@BOTH_KERNELS
def test_noiommu_groups_share_a_container(k, s):
    c, gs = attached(k, s, 0, 1, 2)
    flags = [device_flags(k, s.device(g, name))[0] for g, name in zip(gs, GROUPS)]
    assert flags == [uapi.VFIO_DEVICE_FLAGS_AMBA] * 2 + [uapi.VFIO_DEVICE_FLAGS_PLATFORM]
    assert k.platform_device(RTC).iommu() is None, "no-IOMMU translates nothing"


@BOTH_KERNELS
def test_an_iommu_container_refuses_vfio_noiommu(k, s):
    c, _ = attached(k, s, TEST_GROUP, iommu=None)
    assert check_extension(k, c, NOIOMMU) == 0 and check_extension(k, c, TYPE1V2) == 1
    assert errno_of(k.ioctl, c, uapi.VFIO_SET_IOMMU, NOIOMMU) == errno.ENODEV
    k.ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1V2)
    assert check_extension(k, c, NOIOMMU) == 0


@BOTH_KERNELS
@pytest.mark.parametrize("first, second", [(0, TEST_GROUP), (TEST_GROUP, 0)])
def test_the_two_kinds_of_group_never_mix(k, s, first, second):
    c, _ = attached(k, s, first, iommu=None)
    g = group(k, s, second)
    assert errno_of(s.set_container, g, c) == errno.EPERM
    assert errno_of(k.ioctl, g, uapi.VFIO_GROUP_UNSET_CONTAINER) == errno.EINVAL, "and it was left out"


@BOTH_KERNELS
def test_an_emptied_container_takes_either_kind_again(k, s):
    c, (g,) = attached(k, s, 0)
    k.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert check_extension(k, c, TYPE1V2) == 1, "the last group took vfio-noiommu away"
    other = group(k, s, TEST_GROUP)
    s.set_container(other, c)
    k.ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1V2)
    assert device_flags(k, s.device(other, TEST_DEVICE))[0] & uapi.VFIO_DEVICE_FLAGS_RESET


# -- what vfio-amba and vfio-platform report ------------------------------------------------------------------
@pytest.mark.parametrize("name, flags, region, irq", [
    (RTC, uapi.VFIO_DEVICE_FLAGS_AMBA, (RW | uapi.VFIO_REGION_INFO_FLAG_MMAP, 0x1000), LEVEL),
    (GPIO, uapi.VFIO_DEVICE_FLAGS_AMBA, (RW | uapi.VFIO_REGION_INFO_FLAG_MMAP, 0x1000), LEVEL),
    (SLOT, uapi.VFIO_DEVICE_FLAGS_PLATFORM, (RW, 0x200), uapi.VFIO_IRQ_INFO_EVENTFD)])
def test_device_region_and_irq_info(k, s, name, flags, region, irq):
    fd = device(k, s, name)
    assert device_flags(k, fd) == (flags, 1, 1), "no reset function: no RESET flag"
    info, _ = s.region_info(fd, 0)
    assert (info.flags, info.size, info.offset) == (*region, 0)
    got = s.irq_info(fd, 0)
    assert (got.flags, got.count) == (irq, 1)
    assert errno_of(k.ioctl, fd, uapi.VFIO_DEVICE_RESET) == errno.EINVAL


def test_get_device_fd_matches_the_device_name(k, s):
    _, (g,) = attached(k, s, 0)
    for wrong in (GPIO, "pl031", "vfio-amba-00141031", TEST_DEVICE):
        assert errno_of(s.device, g, wrong) == errno.ENODEV
    s.device(g, RTC)


def test_a_sub_page_region_is_not_mmappable(k, s):
    fd = device(k, s, SLOT)
    assert errno_of(k.mmap, fd, 0x1000, 0) == errno.EINVAL
    assert len(k.pread(fd, 0x400, 0)) == 0x200, "a read past the end is cut short"
    assert errno_of(k.pread, fd, 4, 0x200) == errno.EINVAL


def test_no_reset_on_open_or_close(k, s):
    """Board devices keep their state from one open to the next: nothing resets them."""
    _, (g,) = attached(k, s, GROUPS[RTC])
    fd = s.device(g, RTC)
    s.bar_write(fd, 0, pl031.MR, 0x1234)
    s.close_fd(fd)
    again = s.device(g, RTC)
    assert s.bar_read(again, 0, pl031.MR) == 0x1234 and k.platform_device(RTC).resets == 0


# -- the PL031 ---------------------------------------------------------------------------------------------
@pytest.fixture
def rtc(k, s):
    return device(k, s, RTC)


def test_pl031_registers(k, s, rtc):
    ids = [s.bar_read(rtc, 0, offset) for offset in range(0xFE0, 0x1000, 4)]
    assert ids == [0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
    assert s.bar_read(rtc, 0, 0xFD0) == 0 and s.bar_read(rtc, 0, 0xFE0, 1) == 0x31
    assert s.bar_read(rtc, 0, pl031.CR) == 1
    s.bar_write(rtc, 0, pl031.CR, 0)
    assert s.bar_read(rtc, 0, pl031.CR) == 1, "the RTC cannot be stopped"
    assert abs(s.bar_read(rtc, 0, pl031.DR) - time.time()) < 2, "DR starts at the wall clock"
    s.bar_write(rtc, 0, pl031.IMSC, 0xFF)
    assert s.bar_read(rtc, 0, pl031.IMSC) == 1
    s.bar_write(rtc, 0, pl031.LR, 1000)
    assert s.bar_read(rtc, 0, pl031.LR) == 1000 and s.bar_read(rtc, 0, pl031.DR) in (1000, 1001)
    assert s.bar_read(rtc, 0, pl031.DR, 1) in (1000 & 0xFF, 1001 & 0xFF), "a byte read sees the low byte"
    with k.mmap(rtc, 0x1000, 0) as m:
        assert m.read(0xFE0, 8) == 0x10 << 32 | 0x31, "an 8-byte access is two 4-byte ones"
        m.write(pl031.MR, 4, 0xDEAD)
    assert s.bar_read(rtc, 0, pl031.MR) == 0xDEAD


def test_pl031_match_raises_its_level_interrupt_at_once(k, s, rtc):
    """LR=X then MR=X: the count equals the match, which QEMU fires at once; the line is RIS & IMSC
    and the automasked IRQ signals once until UNMASK. (MR then LR fires at once too, with no
    second boundary between the writes to race.)"""
    p = k.platform_device(RTC)
    efd = trigger(k, s, rtc)
    s.bar_write(rtc, 0, pl031.LR, 5000)
    s.bar_write(rtc, 0, pl031.MR, 5000)
    assert s.bar_read(rtc, 0, pl031.RIS) == 1 and s.bar_read(rtc, 0, pl031.MIS) == 0
    assert k.eventfd_read(efd) == 0, "IMSC clear: the line stays low"
    s.bar_write(rtc, 0, pl031.IMSC, 1)
    assert k.eventfd_read(efd) == 1 and p.irq_masked(0) and p.line(0)
    s.bar_write(rtc, 0, pl031.MR, 5000)
    s.bar_write(rtc, 0, pl031.LR, 5000)
    assert k.eventfd_read(efd) == 0, "automasked: nothing until UNMASK"
    set_irqs(k, rtc, NONE | UNMASK)
    assert k.eventfd_read(efd) == 1 and p.irq_masked(0), "still pending: unmask signals again"
    s.bar_write(rtc, 0, pl031.ICR, 1)
    assert s.bar_read(rtc, 0, pl031.RIS) == 0 and not p.line(0)
    set_irqs(k, rtc, NONE | UNMASK)
    assert k.eventfd_read(efd) == 0 and not p.irq_masked(0)


def test_pl031_no_interrupt_while_masked_and_one_on_unmask(k, s, rtc):
    efd = trigger(k, s, rtc)
    s.bar_write(rtc, 0, pl031.IMSC, 1)
    set_irqs(k, rtc, NONE | MASK)
    s.bar_write(rtc, 0, pl031.MR, 7)
    s.bar_write(rtc, 0, pl031.LR, 7)
    assert k.eventfd_read(efd) == 0 and s.bar_read(rtc, 0, pl031.MIS) == 1
    set_irqs(k, rtc, BOOL | UNMASK, b"\x01")
    assert k.eventfd_read(efd) == 1
    s.bar_write(rtc, 0, pl031.ICR, 1)
    set_irqs(k, rtc, NONE | UNMASK)
    assert k.eventfd_read(efd) == 0


def test_pl031_a_match_behind_the_count_is_years_away(k, s, rtc):
    """QEMU takes MR - count as unsigned: one second behind is 2**32 - 1 seconds ahead."""
    p = k.platform_device(RTC).model
    s.bar_write(rtc, 0, pl031.IMSC, 1)
    s.bar_write(rtc, 0, pl031.LR, 100)
    s.bar_write(rtc, 0, pl031.MR, 99)
    assert s.bar_read(rtc, 0, pl031.RIS) == 0
    assert p.timer.deadline - time.monotonic() > (1 << 32) - 10


def test_pl031_a_match_ahead_fires_on_the_kernel_timer(k, s, rtc):
    efd = trigger(k, s, rtc)
    s.bar_write(rtc, 0, pl031.IMSC, 1)
    s.bar_write(rtc, 0, pl031.LR, 1000)
    s.bar_write(rtc, 0, pl031.MR, 1001)
    assert s.bar_read(rtc, 0, pl031.RIS) == 0
    assert wait_for(lambda: k.eventfd_read(efd) == 1, timeout=3), "one second after the write"
    assert s.bar_read(rtc, 0, pl031.MIS) == 1


def test_pl031_rewriting_the_match_cancels_the_timer(k, s, rtc):
    s.bar_write(rtc, 0, pl031.LR, 1000)
    s.bar_write(rtc, 0, pl031.MR, 1001)
    s.bar_write(rtc, 0, pl031.MR, 1100)
    time.sleep(1.2)
    assert s.bar_read(rtc, 0, pl031.RIS) == 0


# -- the PL061 ---------------------------------------------------------------------------------------------
@pytest.fixture
def gpio(k, s):
    return device(k, s, GPIO)


def test_pl061_registers(k, s, gpio):
    ids = [s.bar_read(gpio, 0, offset) for offset in range(0xFD0, 0x1000, 4)]
    assert ids == [0, 0, 0, 0, 0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
    s.bar_write(gpio, 0, pl061.DIR, 0x10F)
    assert s.bar_read(gpio, 0, pl061.DIR) == 0x0F
    s.bar_write(gpio, 0, 0xFF << 2, 0xFF)
    assert s.bar_read(gpio, 0, 0xFF << 2) == 0x0F, "only outputs take a write"
    assert s.bar_read(gpio, 0, 0x03 << 2) == 0x03, "the address masks what a read shows"
    s.bar_write(gpio, 0, 0x01 << 2, 0)
    assert s.bar_read(gpio, 0, 0xFF << 2) == 0x0E
    s.bar_write(gpio, 0, pl061.AFSEL, 0x1FF)
    assert s.bar_read(gpio, 0, pl061.AFSEL) == 0xFF
    assert s.bar_read(gpio, 0, pl061.IC) == 0 and s.bar_read(gpio, 0, 0x500) == 0, "write-only; Luminary's"


def test_pl061_level_sense_interrupt(k, s, gpio):
    """Line 0 is a low input: sensed by level with IEV low, it latches on every update, so IC clears
    it only once IEV no longer matches."""
    p = k.platform_device(GPIO)
    efd = trigger(k, s, gpio)
    s.bar_write(gpio, 0, pl061.IS, 1)
    assert s.bar_read(gpio, 0, pl061.RIS) == 1 and k.eventfd_read(efd) == 0
    s.bar_write(gpio, 0, pl061.IE, 1)
    assert s.bar_read(gpio, 0, pl061.MIS) == 1 and k.eventfd_read(efd) == 1 and p.irq_masked(0)
    s.bar_write(gpio, 0, pl061.IC, 1)
    assert s.bar_read(gpio, 0, pl061.RIS) == 1, "latched again at once"
    s.bar_write(gpio, 0, pl061.IEV, 1)
    s.bar_write(gpio, 0, pl061.IC, 1)
    assert s.bar_read(gpio, 0, pl061.RIS) == 0 and not p.line(0)
    set_irqs(k, gpio, NONE | UNMASK)
    assert k.eventfd_read(efd) == 0


def test_pl061_an_input_change_latches_an_edge(k, s, gpio):
    """A line driven high as an output and turned back into an input changes as an input: a
    rising edge with IEV high."""
    s.bar_write(gpio, 0, pl061.IEV, 0x02)
    s.bar_write(gpio, 0, pl061.DIR, 0x02)
    s.bar_write(gpio, 0, 0x02 << 2, 0x02)
    assert s.bar_read(gpio, 0, pl061.RIS) == 0
    s.bar_write(gpio, 0, pl061.DIR, 0)
    assert s.bar_read(gpio, 0, pl061.RIS) == 0x02
    s.bar_write(gpio, 0, pl061.IC, 0x02)
    assert s.bar_read(gpio, 0, pl061.RIS) == 0, "an edge stays cleared"


# -- the empty virtio-mmio slot --------------------------------------------------------------------------------
def test_virtio_mmio_answers_as_an_empty_slot(k, s):
    fd = device(k, s, SLOT)
    assert s.bar_read(fd, 0, vm.MAGIC_VALUE) == 0x74726976 and k.pread(fd, 4, 0) == b"virt"
    assert s.bar_read(fd, 0, vm.VERSION) == 1 and s.bar_read(fd, 0, vm.DEVICE_ID) == 0
    assert s.bar_read(fd, 0, vm.VENDOR_ID) == 0x554D4551
    assert s.bar_read(fd, 0, 0x70) == 0 and s.bar_read(fd, 0, 0x1FC) == 0
    s.bar_write(fd, 0, 0x70, 0xF)
    s.bar_write(fd, 0, vm.MAGIC_VALUE, 0)
    assert s.bar_read(fd, 0, 0x70) == 0 and s.bar_read(fd, 0, vm.MAGIC_VALUE) == 0x74726976


def test_virtio_mmio_edge_irq(k, s):
    fd = device(k, s, SLOT)
    p = k.platform_device(SLOT)
    efd = trigger(k, s, fd)
    set_irqs(k, fd, NONE | TRIGGER)
    assert k.eventfd_read(efd) == 1
    set_irqs(k, fd, BOOL | TRIGGER, b"\x01")
    set_irqs(k, fd, NONE | TRIGGER)
    assert k.eventfd_read(efd) == 2 and not p.irq_masked(0), "an edge IRQ never masks"
    assert errno_of(set_irqs, k, fd, NONE | UNMASK) == errno.EINVAL
    assert errno_of(set_irqs, k, fd, NONE | MASK) == errno.EINVAL
