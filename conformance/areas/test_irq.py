"""Interrupts through eventfds: INTx automask and unmask with edu, MSI, MSI-X on e1000e, loopback triggers."""

import errno
import os

import pytest

from vfio_impl import AddressSpace, Device, VFIOError, uapi
from vfio_impl.core import irq

from ..raw import errno_of, profile_of, wait_for, wired_vectors

pytestmark = pytest.mark.vfio(device="edu")
INTX, MSI, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX
REQ = uapi.VFIO_PCI_REQ_IRQ_INDEX
TRIGGER, MASK, UNMASK = uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_ACTION_MASK, uapi.VFIO_IRQ_SET_ACTION_UNMASK
RAISE, ACK = 0x60, 0x64


def set_irqs(vfio, d, buf):
    return vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, buf)


def fired(vfio, efd) -> int:
    return vfio.host.eventfd_read(efd)


@pytest.fixture
def intx(vfio, raw):
    """An edu with INTx wired to an eventfd: (device fd, trigger eventfd)."""
    _, _, d = raw.open_device()
    raw.enable_device(d)
    efd = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(INTX, 0, [efd]))
    yield d, efd
    raw.bar_write(d, 0, ACK, 0xFFFFFFFF)


def test_intx_loopback_data_none(vfio, intx):
    d, efd = intx
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, TRIGGER))
    assert fired(vfio, efd) == 1


@pytest.mark.parametrize("value,expect", [(True, 1), (False, 0)])
def test_intx_loopback_data_bool(vfio, intx, value, expect):
    d, efd = intx
    set_irqs(vfio, d, irq.data_bool(INTX, 0, [value], TRIGGER))
    assert fired(vfio, efd) == expect


def test_intx_from_the_device_is_automasked(vfio, raw, intx):
    d, efd = intx
    raw.bar_write(d, 0, RAISE, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1)
    raw.bar_write(d, 0, ACK, 1)
    raw.bar_write(d, 0, RAISE, 1)
    assert fired(vfio, efd) == 0, "an automasked INTx fired again before UNMASK"
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, UNMASK))
    assert wait_for(lambda: fired(vfio, efd) == 1)


def test_intx_unmask_with_the_line_low_stays_quiet(vfio, raw, intx):
    d, efd = intx
    raw.bar_write(d, 0, RAISE, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1)
    raw.bar_write(d, 0, ACK, 1)
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, UNMASK))
    assert fired(vfio, efd) == 0
    raw.bar_write(d, 0, RAISE, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1)


def test_intx_unmask_eventfd(vfio, raw, intx):
    d, efd = intx
    unmask = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(INTX, 0, [unmask], UNMASK))
    raw.bar_write(d, 0, RAISE, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1)
    raw.bar_write(d, 0, ACK, 1)
    raw.bar_write(d, 0, RAISE, 1)
    assert fired(vfio, efd) == 0
    vfio.host.eventfd_write(unmask, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1), "writing the unmask eventfd did not unmask INTx"
    set_irqs(vfio, d, irq.eventfds(INTX, 0, [-1], UNMASK))


def test_intx_mask_holds_the_interrupt(vfio, raw, intx):
    d, efd = intx
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, MASK))
    raw.bar_write(d, 0, RAISE, 1)
    assert fired(vfio, efd) == 0
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, UNMASK))
    assert wait_for(lambda: fired(vfio, efd) == 1), "the pending interrupt was lost across MASK"


def test_intx_disable_bit_in_command_masks(vfio, raw, intx):
    d, efd = intx
    cmd = raw.config_read(d, 4, 2)
    raw.config_write(d, 4, 2, cmd | 0x400)
    raw.bar_write(d, 0, RAISE, 1)
    assert fired(vfio, efd) == 0
    raw.config_write(d, 4, 2, cmd & ~0x400)
    assert wait_for(lambda: fired(vfio, efd) == 1)


def test_intx_deassign_eventfd(vfio, intx):
    d, efd = intx
    set_irqs(vfio, d, irq.eventfds(INTX, 0, [-1]))
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, TRIGGER))
    assert fired(vfio, efd) == 0


def test_intx_disable(vfio, intx):
    d, efd = intx
    set_irqs(vfio, d, irq.data_none(INTX, 0, 0, TRIGGER))
    assert errno_of(set_irqs, vfio, d, irq.data_none(INTX, 0, 1, TRIGGER)) == errno.EINVAL


def test_msi_while_intx_is_enabled(vfio, raw, intx):
    d, _ = intx
    assert errno_of(set_irqs, vfio, d, irq.eventfds(MSI, 0, [raw.eventfd()])) == errno.EINVAL


@pytest.fixture
def msi(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d, master=True)
    efd = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(MSI, 0, [efd]))
    yield d, efd
    set_irqs(vfio, d, irq.data_none(MSI, 0, 0, TRIGGER))


def test_msi_from_the_device(vfio, raw, msi):
    d, efd = msi
    raw.bar_write(d, 0, RAISE, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1)
    raw.bar_write(d, 0, RAISE, 1)
    assert wait_for(lambda: fired(vfio, efd) == 1), "MSI is an edge per raise, never masked"
    raw.bar_write(d, 0, ACK, 1)


def test_msi_loopback(vfio, msi):
    d, efd = msi
    set_irqs(vfio, d, irq.data_none(MSI, 0, 1, TRIGGER))
    assert fired(vfio, efd) == 1


def test_msi_beyond_the_vectors(vfio, raw, msi):
    d, _ = msi
    assert errno_of(set_irqs, vfio, d, irq.data_none(MSI, 0, 2, TRIGGER)) == errno.EINVAL


def test_msi_mask_is_not_supported(vfio, msi):
    d, _ = msi
    assert errno_of(set_irqs, vfio, d, irq.data_none(MSI, 0, 1, MASK)) == errno.ENOTTY


def test_msi_disable_returns_to_intx(vfio, raw, msi):
    d, _ = msi
    set_irqs(vfio, d, irq.data_none(MSI, 0, 0, TRIGGER))
    efd = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(INTX, 0, [efd]))
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, TRIGGER))
    assert fired(vfio, efd) == 1
    set_irqs(vfio, d, irq.data_none(INTX, 0, 0, TRIGGER))
    efd2 = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(MSI, 0, [efd2]))


def test_req_trigger_loopback(vfio, raw):
    _, _, d = raw.open_device()
    efd = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(REQ, 0, [efd]))
    set_irqs(vfio, d, irq.data_none(REQ, 0, 1, TRIGGER))
    assert fired(vfio, efd) == 1
    set_irqs(vfio, d, irq.eventfds(REQ, 0, [-1]))
    assert errno_of(set_irqs, vfio, d, irq.data_none(REQ, 0, 1, TRIGGER)) == errno.EINVAL


def test_eventfd_reference_outlives_the_users_fd(vfio, raw):
    """The kernel holds its own reference: closing the fd after SET_IRQS keeps the vector wired."""
    _, _, d = raw.open_device()
    efd = vfio.host.eventfd()
    dup = raw.track(os.dup(efd))
    set_irqs(vfio, d, irq.eventfds(INTX, 0, [efd]))
    vfio.host.close(efd)
    set_irqs(vfio, d, irq.data_none(INTX, 0, 1, TRIGGER))
    assert fired(vfio, dup) == 1
    set_irqs(vfio, d, irq.data_none(INTX, 0, 0, TRIGGER))


@pytest.fixture
def device(vfio, vfio_device):
    """The marker's device attached through vfio_impl."""
    with AddressSpace(vfio.host) as space:
        yield Device.attach(space, vfio_device.sysfs)


@pytest.mark.vfio(device="e1000e")
def test_enable_irq_wires_one_eventfd_per_vector(vfio, device):
    """Device.enable_irq: every MSI-X vector in one SET_IRQS; each loopback reaches its own eventfd."""
    count = device.get_irq_info(MSIX).count
    fds = [device.new_eventfd() for _ in range(count)]
    device.enable_irq(MSIX, fds)
    for n in reversed(range(count)):
        device.trigger_irq(MSIX, n)
        assert [fired(vfio, fd) for fd in fds] == [int(i == n) for i in range(count)]
    device.disable_irq(MSIX)
    with pytest.raises(VFIOError) as e:
        device.trigger_irq(MSIX)
    assert e.value.errno == errno.EINVAL, "disable_irq left MSI-X enabled"


@pytest.fixture
def msix_one_vector(vfio, raw):
    """e1000e's MSI-X enabled with vector 0 wired: (device fd, vector 0's eventfd, table size)."""
    _, _, d = raw.open_device()
    efd = raw.eventfd()
    set_irqs(vfio, d, irq.eventfds(MSIX, 0, [efd]))
    yield d, efd, raw.irq_info(d, MSIX).count
    set_irqs(vfio, d, irq.data_none(MSIX, 0, 0, TRIGGER))


@pytest.mark.vfio(device="e1000e")
def test_msix_is_noresize_unless_the_kernel_allocates_vectors_while_enabled(vfio, raw):
    """6.1 sets NORESIZE for MSI-X; 6.12, whose vfio-pci has dynamic MSI-X, does not."""
    _, _, d = raw.open_device()
    noresize = 0 if profile_of(vfio).msix_can_alloc_dyn else uapi.VFIO_IRQ_INFO_NORESIZE
    assert raw.irq_info(d, MSIX).flags == uapi.VFIO_IRQ_INFO_EVENTFD | noresize


@pytest.mark.vfio(device="e1000e")
def test_msix_triggers_with_one_vector_enabled(vfio, msix_one_vector):
    """6.1 takes a trigger only for the vectors enabled; 6.12 for any vector of the table, and
    signals only those with an eventfd. Past the table it is EINVAL on both."""
    d, efd, table = msix_one_vector
    accepted = table if profile_of(vfio).irq_ctx_xarray else 1
    answers = [errno_of(set_irqs, vfio, d, irq.data_bool(MSIX, nr, [True], TRIGGER)) for nr in range(table + 1)]
    assert answers == [0] * accepted + [errno.EINVAL] * (table + 1 - accepted)
    assert fired(vfio, efd) == 1


@pytest.mark.vfio(device="e1000e")
def test_msix_eventfd_for_a_vector_past_those_enabled(vfio, raw, msix_one_vector):
    """With dynamic MSI-X (6.12) the kernel allocates the vector with MSI-X still on, lists its
    handler in /proc/interrupts and fires it on a trigger; 6.1 refuses both with EINVAL."""
    d, first, _ = msix_one_vector
    fourth = raw.eventfd()
    profile = profile_of(vfio)
    dyn = profile.msix_can_alloc_dyn
    assert errno_of(set_irqs, vfio, d, irq.eventfds(MSIX, 3, [fourth])) == (0 if dyn else errno.EINVAL)
    assert wired_vectors(vfio.host, raw.dev.bdf, "msix") == ({0, 3} if dyn else {0})
    trigger = errno_of(set_irqs, vfio, d, irq.data_none(MSIX, 3, 1, TRIGGER))
    assert trigger == (0 if profile.irq_ctx_xarray else errno.EINVAL)
    assert (fired(vfio, fourth), fired(vfio, first)) == (int(dyn), 0)


def test_enable_irq_beyond_the_vectors(vfio, device):
    """edu's MSI has one vector: a second is EINVAL, and nothing is left enabled."""
    fds = [device.new_eventfd(), device.new_eventfd()]
    with pytest.raises(VFIOError) as e:
        device.enable_irq(MSI, fds)
    assert e.value.errno == errno.EINVAL
    device.enable_irq(MSI, fds[:1])
    device.trigger_irq(MSI)
    assert fired(vfio, fds[0]) == 1
    device.disable_irq(MSI)
