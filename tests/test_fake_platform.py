"""vfio-platform in the fake kernel, through the Host API only: the 'platform' topology, its
sysfs, and the platform-test device's regions, interrupts, SET_IRQS errno and reset."""

import errno
import os
import struct

import pytest

from conformance.raw import RawSession, errno_of, wait_for
from fakekernel import FakeKernel, Topology
from fakekernel.devices import platform_test as pt
from vfio_impl import uapi

NAME = "c0000000.platform-test"
DEV = f"/sys/bus/platform/devices/{NAME}"
LEVEL, EDGE, LEVEL2 = 0, 1, 2
NONE, BOOL, EVENTFD = uapi.VFIO_IRQ_SET_DATA_NONE, uapi.VFIO_IRQ_SET_DATA_BOOL, uapi.VFIO_IRQ_SET_DATA_EVENTFD
MASK, UNMASK, TRIGGER = uapi.VFIO_IRQ_SET_ACTION_MASK, uapi.VFIO_IRQ_SET_ACTION_UNMASK, uapi.VFIO_IRQ_SET_ACTION_TRIGGER


@pytest.fixture
def k():
    with FakeKernel("platform") as kernel:
        yield kernel


def attach(k, group=20):
    """A group in a type1 container: its fd (the kernel's close_all closes them)."""
    session = RawSession(k, None)
    c, g = session.container(), session.group(group)
    session.set_container(g, c)
    k.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    return g


def get_device(k, g, name=NAME):
    return RawSession(k, None).device(g, name)


def open_device(k, group=20, name=NAME):
    return get_device(k, attach(k, group), name)


@pytest.fixture
def dev(k):
    return open_device(k)


def device_info(k, fd, argsz=None, cap_offset=0x5A5A):
    layout = uapi.vfio_device_info
    buf = layout.pack(argsz=layout.size if argsz is None else argsz, flags=0, num_regions=0, num_irqs=0,
                      cap_offset=cap_offset)
    k.ioctl(fd, uapi.VFIO_DEVICE_GET_INFO, buf)
    return layout.unpack(buf)


def region_info(k, fd, index, argsz=None, cap_offset=0):
    layout = uapi.vfio_region_info
    buf = layout.pack(argsz=layout.size if argsz is None else argsz, flags=0, index=index, cap_offset=cap_offset,
                      size=0, offset=0)
    k.ioctl(fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
    return layout.unpack(buf)


def irq_info(k, fd, index, argsz=None):
    layout = uapi.vfio_irq_info
    buf = layout.pack(argsz=layout.size if argsz is None else argsz, flags=0, index=index, count=0)
    k.ioctl(fd, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf)
    return layout.unpack(buf)


def set_irqs(k, fd, index, flags, start=0, count=1, data=b"", argsz=None):
    layout = uapi.vfio_irq_set
    head = layout.pack(argsz=layout.size + len(data) if argsz is None else argsz, flags=flags, index=index,
                       start=start, count=count)
    return k.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(head) + data))


def fds(*values):
    return struct.pack(f"<{len(values)}i", *values)


def reg_write(k, fd, offset, value):
    k.pwrite(fd, struct.pack("<I", value), offset)


def reg_read(k, fd, offset):
    return struct.unpack("<I", k.pread(fd, 4, offset))[0]


def trigger(k, fd, index):
    efd = k.eventfd()
    set_irqs(k, fd, index, EVENTFD | TRIGGER, data=fds(efd))
    return efd


# -- topology and sysfs ---------------------------------------------------------------------------
def test_platform_topology_is_platform_only():
    t = Topology.named("platform")
    assert t.devices == []
    assert [d.name for d in t.platform[:4]] == [NAME, "c1000000.no-group", "c2000000.bad-group",
                                                "c4000000.no-of-node"]
    assert [d.group for d in t.platform[:4]] == [20, None, None, 24]
    assert t.groups() == [0, 1, 2, 20, 24] and t.platform_members(20) == t.platform[:1]
    assert Topology.default().platform == [] and Topology.named("vm").platform == []


def test_sysfs_of_the_good_device(k):
    assert k.readlink(DEV) == f"../../../devices/platform/{NAME}"
    assert k.readlink(f"{DEV}/iommu_group") == "../../../kernel/iommu_groups/20"
    assert k.readlink(f"{DEV}/driver") == "../../../bus/platform/drivers/vfio-platform"
    assert k.listdir("/sys/bus/platform/drivers/vfio-platform") == [
        "a000000.virtio_mmio", "bind", NAME, "c1000000.no-group", "c2000000.bad-group",
        "c4000000.no-of-node", "unbind"]
    assert k.read_text(f"{DEV}/driver_override") == "(null)\n"
    assert k.read_text(f"{DEV}/of_node/compatible") == "qemu,platform-test\0vfio,test-device\0"
    assert k.listdir("/sys/kernel/iommu_groups/20/devices") == [NAME]
    assert k.exists(f"/sys/kernel/iommu_groups/20/devices/{NAME}/of_node/compatible")
    assert sorted(k.listdir("/dev/vfio")) == ["20", "24", "noiommu-0", "noiommu-1", "noiommu-2", "vfio"]
    assert k.listdir("/sys/bus/pci/devices") == []


def test_sysfs_of_the_broken_devices(k):
    base = "/sys/bus/platform/devices"
    assert not k.exists(f"{base}/c1000000.no-group/iommu_group")
    assert k.exists(f"{base}/c1000000.no-group/of_node/compatible")
    link = k.readlink(f"{base}/c2000000.bad-group/iommu_group")
    assert link.rsplit("/", 1)[1] == "bogus"
    assert k.readlink(f"{base}/c4000000.no-of-node/iommu_group").endswith("/24")
    assert not k.exists(f"{base}/c4000000.no-of-node/of_node")
    assert not k.exists(f"{base}/no-such-device")
    assert sorted(k.listdir("/sys/kernel/iommu_groups")) == ["0", "1", "2", "20", "24"]
    assert not k.exists("/sys/kernel/iommu_groups/20/name"), "only a no-IOMMU group has a name"


def test_get_device_fd_by_platform_name(k):
    g = attach(k)
    for wrong in ("no-such-device", "c4000000.no-of-node", "0000:00:03.0"):
        assert errno_of(get_device, k, g, wrong) == errno.ENODEV
    fd = get_device(k, g)
    assert k.open_files() == {"container": 1, "group": 1, "device": 1}
    k.close(fd)
    assert k.platform_device(NAME).open_count == 0


# -- GET_INFO / REGION_INFO / IRQ_INFO ------------------------------------------------------------
def test_device_info(k, dev):
    info = device_info(k, dev)
    assert info.flags == uapi.VFIO_DEVICE_FLAGS_PLATFORM | uapi.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (2, 3)
    assert info.cap_offset == 0x5A5A, "platform copies back only up to num_irqs"
    assert device_info(k, dev, argsz=16).num_irqs == 3
    assert errno_of(device_info, k, dev, 15) == errno.EINVAL


def test_region_info(k, dev):
    rw_mmap = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE | uapi.VFIO_REGION_INFO_FLAG_MMAP
    r0, r1 = region_info(k, dev, 0, cap_offset=7), region_info(k, dev, 1)
    assert (r0.flags, r0.size, r0.offset, r0.cap_offset) == (rw_mmap, 0x1000, 0, 7)
    assert (r1.flags, r1.size, r1.offset) == (rw_mmap, 0x2000, 1 << 40)
    assert errno_of(region_info, k, dev, 2) == errno.EINVAL
    assert errno_of(region_info, k, dev, 0, 31) == errno.EINVAL


def test_irq_info(k, dev):
    level = uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
    assert [(i.flags, i.count) for i in (irq_info(k, dev, n) for n in range(3))] == \
        [(level, 1), (uapi.VFIO_IRQ_INFO_EVENTFD, 1), (level, 1)]
    assert errno_of(irq_info, k, dev, 3) == errno.EINVAL
    assert errno_of(irq_info, k, dev, 0, 15) == errno.EINVAL


# -- regions --------------------------------------------------------------------------------------
def test_registers_by_pread_and_pwrite(k, dev):
    assert reg_read(k, dev, pt.REG_ID) == 0x54414C50 and k.pread(dev, 4, 0) == b"PLAT"
    reg_write(k, dev, pt.REG_SCRATCH, 0xDEADBEEF)
    assert reg_read(k, dev, pt.REG_SCRATCH) == 0xDEADBEEF
    assert k.pread(dev, 2, pt.REG_SCRATCH) == bytes(2), "only 4-byte accesses reach the registers"
    k.pwrite(dev, b"\x01\x02", pt.REG_SCRATCH)
    assert reg_read(k, dev, pt.REG_SCRATCH) == 0xDEADBEEF
    assert reg_read(k, dev, 0x40) == 0
    assert len(k.pread(dev, 16, 0x1000 - 8)) == 8, "a read running past the end is cut short"
    assert errno_of(k.pread, dev, 4, 0x1000) == errno.EINVAL
    assert errno_of(k.pread, dev, 4, 2 << 40) == errno.EINVAL


def test_ram_region_is_shared_memory(k, dev):
    off = 1 << 40
    k.pwrite(dev, b"hello", off + 0x100)
    with k.mmap(dev, 0x2000, off) as m:
        assert bytes(m[0x100:0x105]) == b"hello"
        m[0x1FF0:0x1FF4] = b"abcd"
    assert k.pread(dev, 4, off + 0x1FF0) == b"abcd"
    assert errno_of(k.pread, dev, 1, off + 0x2000) == errno.EINVAL


def test_register_mmap_traps_each_access(k, dev):
    with k.mmap(dev, 0x1000, 0) as m:
        assert m.read(pt.REG_ID, 4) == pt.ID
        m.write(pt.REG_SCRATCH, 4, 42)
        assert reg_read(k, dev, pt.REG_SCRATCH) == 42
        m.write(pt.REG_IRQ_RAISE, 4, 1 << LEVEL)
        assert k.platform_device(NAME).line(LEVEL)


def test_mmap_outside_a_region_fails(k, dev):
    assert errno_of(k.mmap, dev, 0x2000, 0) == errno.EINVAL
    assert errno_of(k.mmap, dev, 0x1000, (1 << 40) + 0x2000) == errno.EINVAL
    assert errno_of(k.mmap, dev, 0x1000, 2 << 40) == errno.EINVAL


# -- interrupts -----------------------------------------------------------------------------------
def test_level_irq_automasks_and_unmask_refires_while_asserted(k, dev):
    p = k.platform_device(NAME)
    efd = trigger(k, dev, LEVEL)
    assert not p.irq_masked(LEVEL)
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL)
    assert k.eventfd_read(efd) == 1 and p.irq_masked(LEVEL) and p.line(LEVEL)
    assert reg_read(k, dev, pt.REG_IRQ_LEVEL) == 1 << LEVEL
    reg_write(k, dev, pt.REG_IRQ_LOWER, 1 << LEVEL)
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL)
    assert k.eventfd_read(efd) == 0, "masked: nothing until unmask"
    set_irqs(k, dev, LEVEL, NONE | UNMASK)
    assert k.eventfd_read(efd) == 1 and p.irq_masked(LEVEL), "still asserted: signalled again and re-masked"
    reg_write(k, dev, pt.REG_IRQ_LOWER, 1 << LEVEL)
    set_irqs(k, dev, LEVEL, BOOL | UNMASK, data=b"\x01")
    assert k.eventfd_read(efd) == 0 and not p.irq_masked(LEVEL) and not p.line(LEVEL)
    k.close(efd)


def test_mask_holds_the_line_back(k, dev):
    p = k.platform_device(NAME)
    efd = trigger(k, dev, LEVEL2)
    set_irqs(k, dev, LEVEL2, BOOL | MASK, data=b"\x00")
    assert not p.irq_masked(LEVEL2)
    set_irqs(k, dev, LEVEL2, NONE | MASK)
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL2)
    assert k.eventfd_read(efd) == 0 and p.irq_masked(LEVEL2)
    set_irqs(k, dev, LEVEL2, BOOL | UNMASK, data=b"\x00")
    assert p.irq_masked(LEVEL2)
    set_irqs(k, dev, LEVEL2, BOOL | UNMASK, data=b"\x01")
    assert k.eventfd_read(efd) == 1 and p.irq_masked(LEVEL2)
    k.close(efd)


def test_trigger_set_while_asserted_fires(k, dev):
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL)
    efd = trigger(k, dev, LEVEL)
    assert k.eventfd_read(efd) == 1 and k.platform_device(NAME).irq_masked(LEVEL)
    k.close(efd)


def test_unmask_eventfd_is_a_virqfd(k, dev):
    p = k.platform_device(NAME)
    efd, unmask = trigger(k, dev, LEVEL), k.eventfd()
    set_irqs(k, dev, LEVEL, EVENTFD | UNMASK, data=fds(unmask))
    assert errno_of(set_irqs, k, dev, LEVEL, EVENTFD | UNMASK, 0, 1, fds(unmask)) == errno.EBUSY
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL)
    assert k.eventfd_read(efd) == 1 and p.irq_masked(LEVEL)
    k.eventfd_write(unmask)
    assert wait_for(lambda: k.eventfd_read(efd) == 1), "unmask by eventfd re-fires the asserted line"
    reg_write(k, dev, pt.REG_IRQ_LOWER, 1 << LEVEL)
    k.eventfd_write(unmask)
    assert wait_for(lambda: not p.irq_masked(LEVEL))
    set_irqs(k, dev, LEVEL, EVENTFD | UNMASK, data=fds(-1))
    set_irqs(k, dev, LEVEL, EVENTFD | UNMASK, data=fds(unmask))
    k.close(unmask)
    k.close(efd)


def test_mask_eventfd_is_a_virqfd(k, dev):
    p = k.platform_device(NAME)
    efd, mask = trigger(k, dev, LEVEL), k.eventfd()
    set_irqs(k, dev, LEVEL, EVENTFD | MASK, data=fds(mask))
    k.eventfd_write(mask)
    assert wait_for(lambda: p.irq_masked(LEVEL))
    set_irqs(k, dev, LEVEL, EVENTFD | MASK, data=fds(-1))
    k.close(mask)
    k.close(efd)


def test_edge_irq_signals_each_raise_and_never_masks(k, dev):
    p = k.platform_device(NAME)
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << EDGE)
    efd = trigger(k, dev, EDGE)
    assert k.eventfd_read(efd) == 0, "no latch: an edge before the trigger is lost"
    for _ in range(2):
        reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << EDGE)
        assert k.eventfd_read(efd) == 1
    assert not p.irq_masked(EDGE) and not p.line(EDGE) and reg_read(k, dev, pt.REG_IRQ_LEVEL) == 0
    assert errno_of(set_irqs, k, dev, EDGE, NONE | MASK) == errno.EINVAL
    assert errno_of(set_irqs, k, dev, EDGE, NONE | UNMASK) == errno.EINVAL
    k.close(efd)


def test_loopback_triggers(k, dev):
    p = k.platform_device(NAME)
    level, edge = trigger(k, dev, LEVEL), trigger(k, dev, EDGE)
    set_irqs(k, dev, LEVEL, BOOL | TRIGGER, data=b"\x00")
    assert k.eventfd_read(level) == 0 and not p.irq_masked(LEVEL)
    set_irqs(k, dev, LEVEL, NONE | TRIGGER)
    assert k.eventfd_read(level) == 1 and p.irq_masked(LEVEL), "the automasked handler masks a loopback too"
    set_irqs(k, dev, LEVEL, NONE | TRIGGER)
    assert k.eventfd_read(level) == 0
    set_irqs(k, dev, EDGE, BOOL | TRIGGER, data=b"\x01")
    set_irqs(k, dev, EDGE, NONE | TRIGGER)
    assert k.eventfd_read(edge) == 2
    for efd in (level, edge):
        k.close(efd)


def test_trigger_count_zero_tears_down(k, dev):
    efd = trigger(k, dev, LEVEL)
    set_irqs(k, dev, LEVEL, NONE | TRIGGER, start=0, count=0)
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL)
    assert k.eventfd_read(efd) == 0 and not k.platform_device(NAME).irq_masked(LEVEL)
    set_irqs(k, dev, LEVEL, EVENTFD | TRIGGER, data=fds(efd))
    assert k.eventfd_read(efd) == 1
    set_irqs(k, dev, LEVEL, EVENTFD | TRIGGER, data=fds(-1))
    set_irqs(k, dev, LEVEL, BOOL | UNMASK, data=b"\x01")
    assert k.eventfd_read(efd) == 0, "no trigger: the IRQ stays disabled"
    k.close(efd)


def test_set_irqs_errno(k, dev):
    efd = k.eventfd()
    r, w = os.pipe()
    cases = [
        ((3, NONE | TRIGGER), errno.EINVAL),                     # index >= num_irqs
        ((0, NONE | TRIGGER, 0, 4), errno.EINVAL),               # start + count beyond num_irqs
        ((0, NONE | TRIGGER, 1, 1), errno.EINVAL),               # valid range, but the handler wants start 0
        ((0, NONE | TRIGGER, 0, 2), errno.EINVAL),
        ((0, NONE | MASK, 0, 0), errno.EINVAL),
        ((0, NONE | BOOL | TRIGGER), errno.EINVAL),              # two data types
        ((0, NONE | 1 << 6), errno.EINVAL),                      # an unknown flag bit
        ((0, NONE), errno.ENOTTY),                               # no action
        ((0, NONE | MASK | UNMASK), errno.ENOTTY),               # two actions
        ((0, EVENTFD | TRIGGER, 0, 1, b"", uapi.vfio_irq_set.size + 2), errno.EINVAL),  # argsz short of the data
        ((0, EVENTFD | TRIGGER, 0, 1, fds(12345)), errno.EBADF),
        ((0, EVENTFD | TRIGGER, 0, 1, fds(r)), errno.EINVAL),    # not an eventfd
        ((0, EVENTFD | UNMASK, 0, 1, fds(r)), errno.EINVAL),
    ]
    for args, code in cases:
        assert errno_of(set_irqs, k, dev, *args) == code, args
    assert errno_of(set_irqs, k, dev, 0, NONE | TRIGGER, 0, 1, b"", uapi.vfio_irq_set.size - 1) == errno.EINVAL
    assert errno_of(k.ioctl, dev, uapi.VFIO_DEVICE_SET_IRQS, bytearray(8)) == errno.EFAULT
    # Linux checks start against num_irqs, not the index's one vector: this disables index 0.
    set_irqs(k, dev, LEVEL, EVENTFD | TRIGGER, data=fds(efd))
    assert set_irqs(k, dev, LEVEL, NONE | TRIGGER, start=2, count=0) == 0
    reg_write(k, dev, pt.REG_IRQ_RAISE, 1 << LEVEL)
    assert k.eventfd_read(efd) == 0
    log = k.platform_device(NAME).set_irqs_log
    assert log[0] == (3, NONE | TRIGGER, 0, 1) and log[-1] == (LEVEL, NONE | TRIGGER, 2, 0)
    assert len(log) == len(cases) + 3
    for fd in (efd, r, w):
        os.close(fd)


# -- reset and release ----------------------------------------------------------------------------
def test_reset_reaches_the_model(k, dev):
    p = k.platform_device(NAME)
    after_open = reg_read(k, dev, pt.REG_RESET_COUNT)
    assert after_open == 1, "vfio_platform_open_device resets the device"
    reg_write(k, dev, pt.REG_SCRATCH, 5)
    reg_write(k, dev, pt.REG_IRQ_RAISE, (1 << LEVEL) | (1 << LEVEL2))
    assert k.ioctl(dev, uapi.VFIO_DEVICE_RESET) == 0
    assert reg_read(k, dev, pt.REG_RESET_COUNT) == after_open + 1
    assert reg_read(k, dev, pt.REG_SCRATCH) == 0 and reg_read(k, dev, pt.REG_IRQ_LEVEL) == 0
    assert not p.line(LEVEL) and not p.line(LEVEL2)
    k.close(dev)
    assert p.model.reset_count == after_open + 2, "and so does the last close"


def _proc_fds():
    return len(os.listdir("/proc/self/fd"))


def test_closing_the_device_releases_irq_eventfds(k):
    g = attach(k)
    dev = get_device(k, g)
    p = k.platform_device(NAME)
    efds = [trigger(k, dev, n) for n in range(3)]
    unmask, mask = k.eventfd(), k.eventfd()
    set_irqs(k, dev, LEVEL, EVENTFD | UNMASK, data=fds(unmask))
    set_irqs(k, dev, LEVEL2, EVENTFD | MASK, data=fds(mask))
    set_irqs(k, dev, LEVEL, NONE | MASK)
    before = _proc_fds()
    for fd in (*efds, unmask, mask):
        os.close(fd)
    assert _proc_fds() == before - 5
    k.close(dev)
    assert _proc_fds() == before - 5 - 1 - 5, "the device fd and the kernel's five eventfd references"
    assert not p.irq_masked(LEVEL)
    again = get_device(k, g)
    assert not p.irq_masked(LEVEL) and reg_read(k, again, pt.REG_RESET_COUNT) == 3
    k.close(again)
