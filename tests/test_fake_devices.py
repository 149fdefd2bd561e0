"""The fake's ivshmem-plain and e1000e, and vfio-pci's answers for them, through the Host API of
FakeKernel('vm'). Expected values are the real runner's (Linux 6.1 on QEMU 7.2) where it gave one."""

import errno
import mmap
import struct

import pytest

from conformance.backends import describe, fake_kernel
from conformance.raw import RawSession, errno_of
from fakekernel import FakeKernel, Topology, devices, pci
from fakekernel.devices import e1000e as e
from fakekernel.topology import PciDeviceSpec
from vfio_impl import uapi

EDU, IVSHMEM, E1000E, DOORBELL = "0000:00:03.0", "0000:00:04.0", "0000:01:00.0", "0000:00:06.0"
CFG = uapi.VFIO_PCI_CONFIG_REGION_INDEX
INTX, MSI, MSIX, ERR, REQ = (uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX,
                             uapi.VFIO_PCI_ERR_IRQ_INDEX, uapi.VFIO_PCI_REQ_IRQ_INDEX)
TRIGGER, UNMASK = uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_ACTION_UNMASK
NONE, EVENTFD = uapi.VFIO_IRQ_SET_DATA_NONE, uapi.VFIO_IRQ_SET_DATA_EVENTFD
R, W, MMAP, CAPS = (uapi.VFIO_REGION_INFO_FLAG_READ, uapi.VFIO_REGION_INFO_FLAG_WRITE,
                    uapi.VFIO_REGION_INFO_FLAG_MMAP, uapi.VFIO_REGION_INFO_FLAG_CAPS)
# The real runner's answers: config space as vfio-pci shows it (all else is 0).
IVSHMEM_HEADER = bytes.fromhex("f41a1011030100000100000500000000000050fe000000000c0080fe00000000"
                               "000000000000000000000000f41a001100000000000000000000000000000000")
E1000E_HEADER = bytes.fromhex("8680d310030110000000000200000000000020fe000022fe01c00000000024fe"
                              "0000000000000000000000008680000000000000c8000000000000000a010000")
E1000E_CAPS = bytes.fromhex("1100040003000000032000000000000000000000000000000000000000000000"  # 0xa0: MSI-X
                            "000000000000000001d0220000000000"                                  # 0xc8: PM
                            "05e08000000000000000000000000000"                                  # 0xd0: MSI
                            "10a0010000800000000000001104000000001100")                         # 0xe0: PCIe v1
E1000E_ECAPS = bytes.fromhex("010002140000000000000000302046000000000000e00000a000000000000000"  # 0x100: AER
                             "00000000000000000000000000000000000000000000000000000000000000"
                             "0003000100563412ffff005452")                                      # 0x140: DSN


@pytest.fixture
def kernel():
    with fake_kernel("vm") as k:
        yield k


def session(kernel, bdf, master=False):
    """A device fd with memory decode on, as a driver starts; the group fd comes along for reopening."""
    s = RawSession(kernel, describe(kernel, bdf))
    _, group, fd = s.open_device()
    s.enable_device(fd, master)
    return s, group, fd


@pytest.fixture
def ivshmem(kernel):
    s, _, fd = session(kernel, IVSHMEM)
    yield s, fd
    s.close()


@pytest.fixture
def nic(kernel):
    s, _, fd = session(kernel, E1000E, master=True)
    yield s, fd
    s.close()


def set_irqs(s, fd, index, flags, start, count, fds=()):
    data = struct.pack(f"={len(fds)}i", *fds)
    buf = uapi.vfio_irq_set.pack(argsz=uapi.vfio_irq_set.size + len(data), flags=flags, index=index,
                                 start=start, count=count) + data
    s.host.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, buf)


def enable_msix(s, fd):
    """All five vectors on, one eventfd each."""
    efds = [s.eventfd() for _ in range(5)]
    set_irqs(s, fd, MSIX, EVENTFD | TRIGGER, 0, 5, efds)
    return efds


def raise_lsc(s, fd, index):
    """One eventfd on INTx or MSI, then the NIC raises a link status change it has enabled."""
    efd = s.eventfd()
    set_irqs(s, fd, index, EVENTFD | TRIGGER, 0, 1, [efd])
    s.bar_write(fd, 0, e.IMS, e.ICR_LSC)
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    return efd


def fired(s, efds):
    return [s.host.eventfd_read(f) for f in efds]


def region(s, fd, index):
    info, _ = s.region_info(fd, index)
    return info.flags, info.size


def config(s, fd, offset, size):
    return s.host.pread(fd, size, (CFG << 40) + offset)


def device_flags(s, fd):
    buf = uapi.vfio_device_info.pack(argsz=uapi.vfio_device_info.size)
    s.host.ioctl(fd, uapi.VFIO_DEVICE_GET_INFO, buf)
    return uapi.vfio_device_info.unpack(buf).flags


def sized(s, fd, offset, ones=0xFFFFFFFF):
    """BAR sizing as a driver does it: all ones, read back, restore."""
    orig = s.config_read(fd, offset, 4)
    s.config_write(fd, offset, 4, ones)
    value = s.config_read(fd, offset, 4)
    s.config_write(fd, offset, 4, orig)
    return value


# -- the topology -----------------------------------------------------------------------------
def test_the_vm_topology_is_the_ci_vm(kernel):
    found = {d.bdf: (d.model, d.group, d.driver) for d in (describe(kernel, s.bdf) for s in kernel.topology.devices)}
    assert found == {EDU: ("edu", 1, "vfio-pci"), IVSHMEM: ("ivshmem", 2, "vfio-pci"), E1000E: ("e1000e", 9, "vfio-pci"),
                     DOORBELL: ("ivshmem-doorbell", 4, "vfio-pci")}
    assert Topology.named("default").devices == [PciDeviceSpec(EDU, "edu", 3)]


# -- ivshmem-plain ----------------------------------------------------------------------------
def test_ivshmem_regions_and_irqs(ivshmem):
    s, fd = ivshmem
    assert device_flags(s, fd) == uapi.VFIO_DEVICE_FLAGS_PCI
    assert region(s, fd, 0) == (R | W | MMAP, 256), "a 256-byte BAR alone in its page is mmappable"
    assert region(s, fd, 2) == (R | W | MMAP, 1 << 20)
    assert [region(s, fd, i) for i in (1, 3, 4, 5, 6)] == [(0, 0)] * 5
    assert region(s, fd, CFG) == (R | W, 256)
    assert [s.irq_info(fd, i).count for i in (INTX, MSI, MSIX, REQ)] == [0, 0, 0, 1]
    assert errno_of(s.irq_info, fd, ERR) == errno.EINVAL
    assert errno_of(set_irqs, s, fd, INTX, EVENTFD | TRIGGER, 0, 1, [s.eventfd()]) == errno.EINVAL


def test_ivshmem_config_and_bar_sizing(ivshmem):
    s, fd = ivshmem
    assert config(s, fd, 0, 256) == IVSHMEM_HEADER + bytes(256 - 64)
    assert [sized(s, fd, 0x10 + 4 * i) for i in range(6)] == [0xFFFFFF00, 0, 0xFFF0000C, 0xFFFFFFFF, 0, 0]
    assert sized(s, fd, 0x30, 0xFFFFFFFE) == 0
    s.config_write(fd, 0x40, 4, 0x44332211)
    assert s.config_read(fd, 0x40, 4) == 0x44332211, "bytes no capability claims go to the device raw"
    s.config_write(fd, 0x0D, 1, 0x40)
    assert s.config_read(fd, 0x0D, 1) == 0, "QEMU has no latency timer"
    s.config_write(fd, pci.PCI_COMMAND, 2, 0x0547)
    assert s.config_read(fd, pci.PCI_COMMAND, 2) == 0x0507, "nor a parity error response bit"


def test_ivshmem_registers(ivshmem):
    s, fd = ivshmem
    s.bar_write(fd, 0, 0, 0xFFFFFFFF)
    assert s.bar_read(fd, 0, 0) == 0xFFFFFFFF
    s.bar_write(fd, 0, 1, 0x12, size=1)
    assert s.bar_read(fd, 0, 0) == 0x12, "a narrow write stores the whole register"
    s.bar_write(fd, 0, 4, 5)
    assert [s.bar_read(fd, 0, 4), s.bar_read(fd, 0, 4)] == [5, 0], "INTRSTATUS clears on read"
    s.bar_write(fd, 0, 8, 7)
    s.bar_write(fd, 0, 12, 0x10001)
    assert [s.bar_read(fd, 0, 8), s.bar_read(fd, 0, 12), s.bar_read(fd, 0, 9, 1)] == [0, 0, 0]
    with s.host.mmap(fd, mmap.PAGESIZE, 0) as regs:
        regs.write(0x100, 4, 0x5A5A5A5A)
        assert [regs.read(0, 4), regs.read(0x100, 4)] == [0x12, 0], "past the 256 bytes nothing answers"


def test_ivshmem_shared_memory_is_one_memfd(kernel):
    s, group, fd = session(kernel, IVSHMEM)
    s.host.pwrite(fd, b"hello", (2 << 40) + 0x1000)
    whole = s.host.mmap(fd, 1 << 20, 2 << 40)
    page = s.host.mmap(fd, mmap.PAGESIZE, (2 << 40) + 0x1000)
    assert whole[0x1000:0x1005] == b"hello"
    whole[0x1008:0x100C] = b"abcd"
    assert page[8:12] == b"abcd" and s.host.pread(fd, 4, (2 << 40) + 0x1008) == b"abcd"
    with mmap.mmap(kernel.vfio_devices[IVSHMEM].ram[2], mmap.PAGESIZE, offset=0x1000) as model:
        assert model[:5] == b"hello", "the model's memory is the mapping"
    whole.close()
    page.close()
    s.close_fd(fd)
    again = s.device(group)
    s.enable_device(again)
    assert s.host.pread(again, 5, (2 << 40) + 0x1000) == b"hello", "it outlives the device fd"
    s.close()


def test_ivshmem_has_no_reset(ivshmem):
    s, fd = ivshmem
    assert errno_of(s.host.ioctl, fd, uapi.VFIO_DEVICE_RESET) == errno.EINVAL
    buf = uapi.vfio_pci_hot_reset_info.pack(argsz=12)
    assert errno_of(s.host.ioctl, fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf) == errno.ENODEV


# -- e1000e: what vfio-pci reports ------------------------------------------------------------
def test_e1000e_regions_and_irqs(nic):
    s, fd = nic
    assert device_flags(s, fd) == uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET
    assert [region(s, fd, i) for i in range(4)] == [(R | W | MMAP, 128 << 10), (R | W | MMAP, 128 << 10),
                                                   (R | W, 32), (R | W | MMAP | CAPS, 16 << 10)]
    assert region(s, fd, CFG) == (R | W, 4096)
    short, _ = s.region_info(fd, 3, 36)
    assert (short.argsz, short.cap_offset) == (40, 0), "the cap does not fit: its size comes back"
    info, buf = s.region_info(fd, 3, 40)
    assert uapi.parse_chain(buf, info.cap_offset, "region") == [uapi.MsixMappableCap()]
    assert [s.irq_info(fd, i).count for i in (INTX, MSI, MSIX, ERR, REQ)] == [1, 1, 5, 1, 1]
    assert errno_of(s.host.mmap, fd, mmap.PAGESIZE, 2 << 40) == errno.EINVAL


def test_e1000e_config_space(nic):
    s, fd = nic
    cfg = config(s, fd, 0, 4096)
    assert cfg[:0x40] == E1000E_HEADER[:4] + b"\x07\x01" + E1000E_HEADER[6:], "as the real one, with MEM and MASTER on"
    assert cfg[0xA0:0xF4] == E1000E_CAPS and cfg[0x100:0x14C] == E1000E_ECAPS
    assert not any(cfg[0x40:0xA0] + cfg[0xF4:0x100] + cfg[0x14C:])
    chain, at = [], cfg[0x34]
    while at:
        chain.append((at, cfg[at]))
        at = cfg[at + 1]
    assert chain == [(0xC8, 0x01), (0xD0, 0x05), (0xE0, 0x10), (0xA0, 0x11)]
    sizes = [sized(s, fd, 0x10 + 4 * i) for i in range(6)]
    assert sizes == [0xFFFE0000, 0xFFFE0000, 0xFFFFFFE1, 0xFFFFC000, 0, 0]


@pytest.mark.parametrize("offset, data, reads", [
    (0xE8, b"\x5f\x00", b"\x40\x00"),       # DEVCTL: payload is virtual, the rest read-only in QEMU
    (0xE8, b"\x00\x80", b"\x00\x00"),       # the virtual FLR bit always reads 0
    (0xE8, b"\x00\x02", b"\x00\x00"),       # phantom functions are not writable
    (0xCC, b"\x00\x01", b"\x00\x00"),       # PME_En is virtual and not writable
    (0x108, b"\xff" * 4, b"\x00" * 4),      # QEMU 7.2 keeps the uncorrectable error mask read-only
    (0x114, b"\xff" * 4, b"\xc1\xf1\x00\x00"),
    (0x118, b"\xff" * 4, b"\xe0\x01\x00\x00"),
    (0x100, b"\x00" * 4, b"\x01\x00\x02\x14"),
    (0x144, b"\x00" * 4, b"\x56\x34\x12\xff"),
    (0x12C, b"\xff" * 4, b"\x00" * 4),      # past AER's 0x2c bytes, inside QEMU's: raw and read-only
    (0x200, b"\x12\x34\x56\x78", b"\x12\x34\x56\x78"),
    (0xD2, b"\x71\x00", b"\x00\x00"),       # MSI flags: the virtual copy loses its 64-bit bit
    (0xA2, b"\x04\x80", b"\x04\x00"),       # MSI-X is enabled by ioctl only
])
def test_e1000e_config_writes(nic, offset, data, reads):
    s, fd = nic
    s.host.pwrite(fd, data, (CFG << 40) + offset)
    assert config(s, fd, offset, len(data)) == reads


def test_e1000e_hot_reset_info(nic):
    s, fd = nic
    small = bytearray(uapi.vfio_pci_hot_reset_info.pack(argsz=12))
    assert errno_of(s.host.ioctl, fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, small) == errno.ENOSPC
    assert uapi.vfio_pci_hot_reset_info.unpack(small).count == 1
    big = bytearray(76)
    uapi.vfio_pci_hot_reset_info.pack_into(big, 0, argsz=76)
    s.host.ioctl(fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, big)
    dev = uapi.vfio_pci_dependent_device.unpack(bytes(big[12:20]))
    assert (dev.group_id, dev.segment, dev.bus, dev.devfn) == (9, 0, 1, 0)


# -- e1000e: the device -----------------------------------------------------------------------
def test_e1000e_registers_at_power_on(nic):
    s, fd = nic
    regs = {name: s.bar_read(fd, 0, reg) for name, reg in
            (("CTRL", e.CTRL), ("STATUS", e.STATUS), ("IMS", e.IMS), ("PBA", e.PBA), ("RAL0", e.RAL0), ("RAH0", e.RAH0))}
    assert regs == {"CTRL": 0x140241, "STATUS": 0x80283, "IMS": 0, "PBA": 0x140014,
                    "RAL0": 0x12005452, "RAH0": 0x80005634}
    assert s.bar_read(fd, 0, e.STATUS + 1, 1) == 0x83, "a narrow read sees the register's low bytes"
    s.bar_write(fd, 0, e.IVAR + 1, 0x8A, size=1)
    assert s.bar_read(fd, 0, e.IVAR) == 0x8A, "a narrow write stores the whole register"
    s.bar_write(fd, 0, e.IMS, 0xFFFFFFFF)
    assert s.bar_read(fd, 0, e.IMS) == 0x1F782D7
    s.bar_write(fd, 0, e.EITR, 0x12345)
    s.bar_write(fd, 0, e.CTRL_EXT, 0xFFFFFFFF)
    assert [s.bar_read(fd, 0, e.EITR), s.bar_read(fd, 0, e.CTRL_EXT), s.bar_read(fd, 0, e.IMC)] == \
        [0x2345, 0xFFFFCFFF, 0]


def test_e1000e_icr_clears_on_read_unless_msix(nic):
    s, fd = nic
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    assert [s.bar_read(fd, 0, e.ICR), s.bar_read(fd, 0, e.ICR)] == [0x80000004, 0]
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC | e.ICR_RXO)
    s.bar_write(fd, 0, e.ICR, e.ICR_OTHER)
    assert s.bar_read(fd, 0, e.ICS) == 0, "clearing OTHER clears the causes it stands for"
    enable_msix(s, fd)
    s.bar_write(fd, 0, e.IMS, e.ICR_LSC)
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    assert [s.bar_read(fd, 0, e.ICR), s.bar_read(fd, 0, e.ICR)] == [0x81000004] * 2


def test_e1000e_msix_needs_other_in_ims(nic):
    s, fd = nic
    efds = enable_msix(s, fd)
    s.bar_write(fd, 0, e.IVAR, 0x8 | (0x9 << 8) | (0xA << 16))
    s.bar_write(fd, 0, e.IMS, e.ICR_LSC)
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    assert fired(s, efds) == [0] * 5, "LSC alone is not a cause MSI-X sends"
    s.bar_write(fd, 0, e.IMS, e.ICR_OTHER)
    assert fired(s, efds) == [0, 0, 1, 0, 0], "OTHER goes to the vector IVAR gives it"
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    assert fired(s, efds) == [0] * 5, "a cause still pending is not sent again"


def test_e1000e_msix_routes_queue_causes_through_ivar(nic):
    s, fd = nic
    efds = enable_msix(s, fd)
    s.bar_write(fd, 0, e.IVAR, 0x8 | (0xB << 4) | (0x9 << 8) | (0xC << 12) | (0xA << 16))
    s.bar_write(fd, 0, e.IMS, 0x01F00000)
    s.bar_write(fd, 0, e.ICS, e.ICR_RXQ0 | e.ICR_RXQ1 | e.ICR_TXQ0 | e.ICR_TXQ1)
    assert fired(s, efds) == [1, 1, 0, 1, 1]
    s.bar_write(fd, 0, e.ICR, 0xFFFFFFFF)
    s.bar_write(fd, 0, e.EIAC, e.ICR_RXQ0)
    s.bar_write(fd, 0, e.ICS, e.ICR_RXQ0)
    assert fired(s, efds) == [1, 0, 0, 0, 0]
    assert s.bar_read(fd, 0, e.IMS) & e.ICR_RXQ0 == 0, "EIAC auto-clears the cause and, without IAME, masks it"
    s.bar_write(fd, 0, e.IVAR, 0)
    s.bar_write(fd, 0, e.IMS, e.ICR_RXQ0)
    s.bar_write(fd, 0, e.ICS, e.ICR_RXQ0)
    assert fired(s, efds) == [0] * 5, "an IVAR entry without its valid bit sends nothing"


def test_e1000e_masked_vector_waits_in_the_pba(nic):
    s, fd = nic
    efds = enable_msix(s, fd)
    s.bar_write(fd, 0, e.IVAR, 0x8)
    s.bar_write(fd, 0, e.IMS, e.ICR_RXQ0)
    set_irqs(s, fd, MSIX, EVENTFD | TRIGGER, 0, 1, [-1])
    s.bar_write(fd, 0, e.ICS, e.ICR_RXQ0)
    assert fired(s, efds) == [0] * 5
    assert s.host.pread(fd, 8, (3 << 40) + e.MSIX_PBA) == bytes([1]) + bytes(7)
    with s.host.mmap(fd, 16 << 10, 3 << 40, mmap.PROT_READ) as table:
        assert table[0:16] == bytes(12) + bytes([1, 0, 0, 0]), "freed: masked, message zeroed"
        set_irqs(s, fd, MSIX, EVENTFD | TRIGGER, 0, 1, [efds[0]])
        assert fired(s, efds) == [1, 0, 0, 0, 0]
        assert table[12:16] == bytes(4) and table[0x2000:0x2008] == bytes(8)


def test_e1000e_msix_table_is_a_hole_for_pread(nic):
    s, fd = nic
    bar3 = 3 << 40
    assert s.host.pread(fd, 16, bar3) == b"\xff" * 16
    assert s.host.pread(fd, 8, bar3 + 0x4C) == b"\xff" * 4 + bytes(4), "the hole ends with the table"
    s.host.pwrite(fd, b"\x11\x22\x33\x44", bar3)
    with s.host.mmap(fd, 16 << 10, bar3, mmap.PROT_READ) as table:
        assert table[0:16] == bytes(12) + bytes([1, 0, 0, 0]), "the write was dropped; the table is the device's"
    s.host.pwrite(fd, b"\xff" * 8, bar3 + e.MSIX_PBA)
    assert s.host.pread(fd, 8, bar3 + e.MSIX_PBA) == bytes(8)


def test_e1000e_intx_follows_icr_and_ims(nic):
    s, fd = nic
    efd = raise_lsc(s, fd, INTX)
    assert s.host.eventfd_read(efd) == 1
    assert s.config_read(fd, pci.PCI_STATUS, 2) & pci.PCI_STATUS_INTERRUPT
    set_irqs(s, fd, INTX, NONE | UNMASK, 0, 1)
    assert s.host.eventfd_read(efd) == 1, "unmasked with the line still up: sent again"
    assert s.bar_read(fd, 0, e.ICR) == 0x80000004
    set_irqs(s, fd, INTX, NONE | UNMASK, 0, 1)
    assert s.host.eventfd_read(efd) == 0, "reading ICR dropped the line"
    assert not s.config_read(fd, pci.PCI_STATUS, 2) & pci.PCI_STATUS_INTERRUPT
    s.bar_write(fd, 0, e.ICS, 0x10)
    assert s.host.eventfd_read(efd) == 0, "a cause IMS does not enable raises nothing"
    assert s.bar_read(fd, 0, e.IAC) == 1 and s.bar_read(fd, 0, e.IAC) == 0


def test_e1000e_msi_once_per_new_cause(nic):
    s, fd = nic
    efd = raise_lsc(s, fd, MSI)
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    assert s.host.eventfd_read(efd) == 1
    assert s.bar_read(fd, 0, e.ICR) == 0x80000004
    s.bar_write(fd, 0, e.ICS, e.ICR_LSC)
    assert s.host.eventfd_read(efd) == 1


def test_e1000e_io_bar_is_a_window_on_the_registers(nic):
    s, fd = nic
    s.bar_write(fd, 2, e.IOADDR, e.STATUS)
    assert s.bar_read(fd, 2, e.IODATA) == 0x80283
    s.bar_write(fd, 2, e.IOADDR, e.IMS)
    s.bar_write(fd, 2, e.IODATA, e.ICR_LSC)
    assert s.bar_read(fd, 0, e.IMS) == e.ICR_LSC and s.bar_read(fd, 2, e.IOADDR) == e.IMS
    s.bar_write(fd, 2, e.IOADDR, 0x20000)
    assert s.host.pread(fd, 32, 2 << 40) == bytes([0, 0, 2, 0]) + bytes(28)
    s.bar_write(fd, 0, e.CTRL, s.bar_read(fd, 0, e.CTRL) | e.CTRL_GIO_MASTER_DISABLE)
    assert s.bar_read(fd, 0, e.STATUS) == 0x283


def test_e1000e_reset_is_a_pm_cycle_qemu_ignores(kernel):
    s, group, fd = session(kernel, E1000E)
    s.bar_write(fd, 0, e.IMS, e.ICR_LSC)
    s.bar_write(fd, 0, e.IVAR, 0xA0908)
    command = s.config_read(fd, pci.PCI_COMMAND, 2)
    s.host.ioctl(fd, uapi.VFIO_DEVICE_RESET)
    assert [s.bar_read(fd, 0, e.IMS), s.bar_read(fd, 0, e.IVAR)] == [e.ICR_LSC, 0xA0908]
    assert s.config_read(fd, pci.PCI_COMMAND, 2) == command
    s.close_fd(fd)
    again = s.device(group)
    assert s.config_read(again, pci.PCI_COMMAND, 2) == 0x0103, "the header saved at the first open returns"
    s.enable_device(again)
    assert s.bar_read(again, 0, e.IVAR) == 0xA0908, "closing resets the same way"
    s.close()


# -- vfio-pci's rules on capabilities the catalog does not have -------------------------------
class ExtCapsFunction(pci.PciFunction):
    """A PCIe function whose extended chain starts and continues with capabilities vfio-pci hides."""

    pcie = True
    model = "ext-caps"

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(0, pci.Bar(0x100))
        self.add_capability(0x04, 0x40, 4)
        self.add_pcie_v1(0x50)
        for cap_id, offset, size in ((0x1F, 0x100, 12), (pci.PCI_EXT_CAP_ID_ERR, 0x140, pci.PCI_ERR_SIZEOF),
                                     (0x1E, 0x190, 8), (pci.PCI_EXT_CAP_ID_DSN, 0x1A0, 12)):
            self.add_ext_capability(cap_id, 1, offset, size)


@pytest.fixture
def ext_kernel(monkeypatch):
    monkeypatch.setitem(devices.CATALOG, ExtCapsFunction.model, ExtCapsFunction)
    with FakeKernel(Topology([PciDeviceSpec(E1000E, ExtCapsFunction.model, 9, bars={0: 0xFE000080})])) as k:
        yield k


def test_unknown_capabilities_are_hidden(ext_kernel):
    s, _, fd = session(ext_kernel, E1000E)
    header = lambda at: struct.unpack("<I", config(s, fd, at, 4))[0]
    assert config(s, fd, 0x34, 1) == b"\x50", "the slot ID capability is skipped"
    assert header(0x100) == 0x140 << 20, "an unknown first one leaves only its next pointer"
    assert header(0x140) == pci.PCI_EXT_CAP_ID_ERR | (1 << 16) | (0x1A0 << 20), "a later one is jumped over"
    assert header(0x190) == 0x1E | (1 << 16) | (0x1A0 << 20), "and its bytes read raw"
    assert region(s, fd, 0) == (R | W, 0x100), "a small BAR that does not start a page is not mmappable"
    s.close()


def test_mmap_support_is_fixed_at_the_first_open(ext_kernel):
    """vfio_pci_probe_mmaps runs in vfio_pci_core_enable: a BAR moved to a page of its own while
    the device is open keeps the answer of the open, and the next first open sees the move."""
    s, _, fd = session(ext_kernel, E1000E)
    struct.pack_into("<I", ext_kernel.functions[E1000E].config, pci.PCI_BASE_ADDRESS_0, 0xFE000000)
    assert region(s, fd, 0) == (R | W, 0x100)
    with pytest.raises(OSError) as exc:
        ext_kernel.mmap(fd, 4096, 0)
    assert exc.value.errno == errno.EINVAL
    s.close()
    s, _, fd = session(ext_kernel, E1000E)
    assert region(s, fd, 0) == (R | W | uapi.VFIO_REGION_INFO_FLAG_MMAP, 0x100)
    s.close()
