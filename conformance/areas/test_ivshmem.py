"""ivshmem-doorbell through vfio-pci, with a second peer at the same ivshmem server: BAR0's
registers, BAR1's MSI-X table and PBA, BAR2's shared memory, and doorbells both ways.

QEMU 7.2 keeps the registers across a vfio-pci open (the device has no reset), so a test puts
back what it wrote. Its interrupts are MSI-X only: a doorbell rung while MSI-X is off or bus
master is clear is dropped, so a test wires its vectors before the peer rings.
"""

import mmap
import select

import pytest

from vfio_impl import uapi
from vfio_impl.core import irq

pytestmark = pytest.mark.vfio(device="ivshmem-doorbell")

INTRMASK, INTRSTATUS, IVPOSITION, DOORBELL = 0, 4, 8, 12
MSIX = uapi.VFIO_PCI_MSIX_IRQ_INDEX
MSIX_CAP, MSIX_BAR, PBA = 0x40, 1, 0x800
VECTORS = 2  # ivshmem-doorbell,vectors=2 in the CI VM and in the fake's vm topology
SHM = 2
PAGE = mmap.PAGESIZE
WAIT, QUIET = 5.0, 0.2


@pytest.fixture
def dev(raw):
    """The device fd, memory decode and bus master on; INTRMASK put back afterwards."""
    _, _, d = raw.open_device()
    raw.enable_device(d, master=True)
    yield d
    raw.bar_write(d, 0, INTRMASK, 0)


def msix_on(vfio, raw, d, count: int = VECTORS) -> list[int]:
    """SET_IRQS with a trigger eventfd per vector; vfio-pci sets MSI-X enable by itself."""
    fds = [raw.eventfd() for _ in range(count)]
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(MSIX, 0, fds))
    return fds


def fired(vfio, fd: int, timeout: float = WAIT) -> bool:
    """Whether the trigger eventfd was signalled within `timeout`; its count is consumed."""
    return bool(select.select([fd], [], [], timeout)[0]) and vfio.host.eventfd_read(fd) > 0


def ring_device(raw, d, dest: int, vector: int) -> None:
    raw.bar_write(d, 0, DOORBELL, (dest << 16) | vector)


# -- BAR0: the registers --------------------------------------------------------------------
def test_intrmask_reads_back_what_was_written(raw, dev):
    for value in (0xA5A5A5A5, 0x00000001, 0):
        raw.bar_write(dev, 0, INTRMASK, value)
        assert raw.bar_read(dev, 0, INTRMASK) == value


def test_intrstatus_keeps_a_write_until_a_read_clears_it(raw, dev):
    raw.bar_write(dev, 0, INTRSTATUS, 0x5)
    assert [raw.bar_read(dev, 0, INTRSTATUS) for _ in range(2)] == [0x5, 0]


def test_ivposition_is_the_id_the_server_gave_the_device(raw, dev, ivshmem_peer):
    assert raw.bar_read(dev, 0, IVPOSITION) == ivshmem_peer.device_id != ivshmem_peer.id


@pytest.mark.parametrize("offset", [DOORBELL, 0x10, 0x80, 0xFC])
def test_other_offsets_read_zero(raw, dev, offset):
    assert raw.bar_read(dev, 0, offset) == 0


def test_registers_are_four_bytes_wide_at_their_exact_address(raw, dev):
    """A narrow read gets the low bytes of the register its address names, and an address inside
    a register names none; a narrow write stores its value, zero-extended, in the whole register."""
    raw.bar_write(dev, 0, INTRMASK, 0x11223344)
    assert (raw.bar_read(dev, 0, INTRMASK, 1), raw.bar_read(dev, 0, INTRMASK, 2)) == (0x44, 0x3344)
    assert (raw.bar_read(dev, 0, INTRMASK + 1, 1), raw.bar_read(dev, 0, INTRMASK + 2, 2)) == (0, 0)
    raw.bar_write(dev, 0, INTRMASK, 0xAA, 1)
    assert raw.bar_read(dev, 0, INTRMASK) == 0xAA


def test_a_narrow_read_of_intrstatus_clears_all_of_it(raw, dev):
    raw.bar_write(dev, 0, INTRSTATUS, 0x0102)
    assert raw.bar_read(dev, 0, INTRSTATUS, 1) == 0x02
    assert raw.bar_read(dev, 0, INTRSTATUS) == 0


# -- BAR1: MSI-X ----------------------------------------------------------------------------
def test_msix_table_and_pba_share_the_exclusive_bar1(vfio, raw, dev):
    """msix_init_exclusive_bar: the capability at 0x40 names BAR1 for both, the table at 0 and
    the PBA half way; vfio-pci reports one vector per entry and lets the BAR be mapped."""
    control, table, pba = (raw.config_read(dev, MSIX_CAP + off, size) for off, size in ((2, 2), (4, 4), (8, 4)))
    assert (raw.config_read(dev, MSIX_CAP, 1), control & 0x7FF, table, pba) == (0x11, VECTORS - 1, MSIX_BAR, PBA | MSIX_BAR)
    assert raw.irq_info(dev, MSIX).count == VECTORS
    info, buf = raw.region_info(dev, MSIX_BAR, argsz=256)
    assert {type(cap) for cap in uapi.parse_chain(buf, info.cap_offset, "region")} == {uapi.MsixMappableCap}
    assert raw.bar_read(dev, MSIX_BAR, 0) == 0xFFFFFFFF, "the table is the kernel's: pread sees all ones"
    assert raw.bar_read(dev, MSIX_BAR, PBA) == 0


def test_a_masked_vector_holds_its_doorbell_in_the_pba(vfio, raw, dev, ivshmem_peer):
    """De-assigning a vector masks it in the table; the doorbell waits as a pending bit and goes
    out when the vector gets an eventfd again."""
    fds = msix_on(vfio, raw, dev)
    vfio.host.ioctl(dev, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(MSIX, 1, [-1]))
    ivshmem_peer.ring(1)
    assert raw.bar_read(dev, MSIX_BAR, PBA) == 1 << 1
    vfio.host.ioctl(dev, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(MSIX, 1, [fds[1]]))
    assert fired(vfio, fds[1])
    assert raw.bar_read(dev, MSIX_BAR, PBA) == 0


# -- BAR2: the shared memory ----------------------------------------------------------------
def test_bar2_is_the_memory_the_peer_maps(vfio, raw, dev, ivshmem_peer):
    m = vfio.host.mmap(dev, PAGE, SHM << 40)
    try:
        m[0x200:0x208] = b"guest->p"
        assert ivshmem_peer.read_shm(0x200, 8) == b"guest->p"
        ivshmem_peer.write_shm(0x300, b"peer->guest")
        assert bytes(m[0x300:0x30B]) == b"peer->guest"
    finally:
        m.close()
    assert vfio.host.pread(dev, 11, (SHM << 40) + 0x300) == b"peer->guest"


# -- doorbells from the peer ------------------------------------------------------------------
@pytest.mark.parametrize("vector", range(VECTORS))
def test_a_peer_doorbell_arrives_on_its_msix_trigger(vfio, raw, dev, ivshmem_peer, vector):
    fds = msix_on(vfio, raw, dev)
    ivshmem_peer.ring(vector)
    assert fired(vfio, fds[vector])
    assert [fired(vfio, fd, 0) for fd in fds] == [False] * VECTORS


def test_a_doorbell_rung_while_msix_is_off_is_lost(vfio, raw, dev, ivshmem_peer):
    ivshmem_peer.ring(0)
    fds = msix_on(vfio, raw, dev)
    assert not fired(vfio, fds[0], QUIET), "the doorbell was queued, not dropped"
    ivshmem_peer.ring(0)
    assert fired(vfio, fds[0])


def test_a_doorbell_without_bus_master_is_lost(vfio, raw, dev, ivshmem_peer):
    fds = msix_on(vfio, raw, dev)
    raw.config_write(dev, 0x04, 2, raw.config_read(dev, 0x04, 2) & ~0x4)
    ivshmem_peer.ring(0)
    raw.enable_device(dev, master=True)
    assert not fired(vfio, fds[0], QUIET), "the message waited for bus master"
    ivshmem_peer.ring(0)
    assert fired(vfio, fds[0])


def test_a_doorbell_to_its_own_id_comes_back_as_its_own_vector(vfio, raw, dev):
    fds = msix_on(vfio, raw, dev)
    ring_device(raw, dev, raw.bar_read(dev, 0, IVPOSITION), 1)
    assert fired(vfio, fds[1])
    assert not fired(vfio, fds[0], 0)


# -- doorbells to the peer ------------------------------------------------------------------
@pytest.mark.parametrize("vector", range(VECTORS))
def test_a_doorbell_write_reaches_the_peer_on_that_vector(raw, dev, ivshmem_peer, vector):
    ring_device(raw, dev, ivshmem_peer.id, vector)
    assert ivshmem_peer.wait_doorbell(vector)
    assert not any(ivshmem_peer.wait_doorbell(v, 0) for v in range(VECTORS))


@pytest.mark.parametrize("high", [0x100, 0xFF00])
def test_the_vector_is_the_doorbells_low_byte(raw, dev, ivshmem_peer, high):
    """ivshmem_io_write's `val & 0xff`: bits 8-15 name no vector of their own."""
    ring_device(raw, dev, ivshmem_peer.id, high | 1)
    assert ivshmem_peer.wait_doorbell(1)
    assert not ivshmem_peer.wait_doorbell(0, 0)
    ring_device(raw, dev, ivshmem_peer.id, high)
    assert ivshmem_peer.wait_doorbell(0)
    assert not ivshmem_peer.wait_doorbell(1, QUIET)


def test_a_doorbell_to_an_unknown_peer_or_vector_is_ignored(raw, dev, ivshmem_peer):
    """Nothing rings, and the device still rings a good doorbell after them."""
    for dest, vector in ((ivshmem_peer.id, VECTORS), (ivshmem_peer.id, 0xFF), (0xFFFF, 0), (ivshmem_peer.id + 100, 0)):
        ring_device(raw, dev, dest, vector)
    ring_device(raw, dev, ivshmem_peer.id, 1)
    assert ivshmem_peer.wait_doorbell(1)
    assert not ivshmem_peer.wait_doorbell(0, QUIET)
