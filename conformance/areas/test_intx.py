"""INTx through the PCI flavour, as the guest sees it: edu asserts the guest line, a trapped BAR
access is the EOI, and the mmap timer runs on the machine's virtual clock; on a machine that
plays KVM's irqfd the line is KVM's, and the guest's EOI there unmasks through the resample
eventfd."""

import errno

import pytest

from vfio_impl import uapi
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY

from ..raw import RefusedAccess, assert_fast_path_back_after

pytestmark = pytest.mark.vfio(device="edu")
RAISE, ACK, IDENT = 0x60, 0x64, 0x00
WAIT = 2.0
INTX, UNMASK = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_IRQ_SET_ACTION_UNMASK
# SET_IRQS calls as (index, flags): the UNMASK ioctl, and the resample eventfd's wiring.
UNMASK_IOCTL = (INTX, uapi.VFIO_IRQ_SET_DATA_NONE | UNMASK)
UNMASK_EVENTFD = (INTX, uapi.VFIO_IRQ_SET_DATA_EVENTFD | UNMASK)


class SetIrqsLog:
    """The device's host with each SET_IRQS written down and, where asked, refused with EINVAL,
    as a kernel without virqfd support would answer."""

    def __init__(self, host, refuse=()):
        self._host = host
        self._refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self._host, name)

    def ioctl(self, fd, request, arg):
        if request == uapi.VFIO_DEVICE_SET_IRQS:
            hdr = uapi.vfio_irq_set.unpack(bytes(arg))
            self.calls.append((hdr.index, hdr.flags))
            if self.calls[-1] in self._refuse:
                raise OSError(errno.EINVAL, "refused by the test")
        return self._host.ioctl(fd, request, arg)


def log_set_irqs(dev, refuse=()) -> SetIrqsLog:
    log = SetIrqsLog(dev.vbasedev.host, refuse)
    dev.vbasedev.host = log
    return log


@pytest.fixture
def realize(vfio_pci):
    """edu realized with memory decode on (INTx in user space unless asked), each one acked on
    the way out: edu has no reset, so a raised interrupt would outlive the test on real."""
    devices = []

    def realize_edu(**options):
        dev = vfio_pci(**{"x_kvm_intx": False, **options})
        dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
        devices.append(dev)
        return dev
    yield realize_edu
    for dev in devices:
        dev.bar_write(0, ACK, 0xFFFFFFFF, 4)


@pytest.fixture
def edu(realize):
    return realize()


def raise_intx(dev) -> None:
    dev.bar_write(0, RAISE, 1, 4)
    assert dev.machine.run_until(lambda: dev.intx.pending, WAIT), "edu's INTx never reached the machine"


def test_an_interrupt_asserts_the_guest_line_and_turns_the_fast_path_off(edu):
    """While an interrupt is pending every BAR access must trap, or the guest's EOI is missed."""
    line = edu.intx.line
    assert edu.interrupt == "intx" and not line.level and edu.mmap_enabled()
    raise_intx(edu)
    assert line.level and line.history == [True]
    assert not edu.mmap_enabled()


def test_the_eoi_by_bar_access_lowers_the_line_and_unmasks(edu):
    log = log_set_irqs(edu)
    raise_intx(edu)
    edu.bar_write(0, ACK, 1, 4)
    assert not edu.intx.pending and edu.intx.line.history == [True, False]
    assert UNMASK_IOCTL in log.calls, "the user-space EOI did not UNMASK"
    raise_intx(edu)


def test_an_eoi_with_the_line_still_up_asserts_it_again(edu):
    """Reading a register is an EOI too; edu still asserts, so the UNMASK fires again at once."""
    raise_intx(edu)
    assert edu.bar_read(0, IDENT, 4) == 0x010000ED
    assert not edu.intx.line.level
    assert edu.machine.run_until(lambda: edu.intx.pending, WAIT), "UNMASK of a still-high line did not re-fire"
    assert edu.intx.line.history == [True, False, True]


def test_without_irqfd_intx_stays_in_user_space(realize):
    dev = realize(x_kvm_intx=True)
    assert not dev.intx.kvm_accel and dev.intx.unmask == -1 and dev.machine.has_fd_handler(dev.intx.interrupt)
    raise_intx(dev)
    assert not dev.mmap_enabled()


def raise_through_kvm(dev) -> None:
    dev.bar_write(0, RAISE, 1, 4)
    assert dev.machine.run_until(lambda: dev.intx.line.level, WAIT), "KVM's irqfd did not assert the line"


def ack_and_eoi(dev) -> None:
    """edu's ack, then the guest's EOI in KVM."""
    dev.bar_write(0, ACK, 1, 4)
    dev.machine.eoi(dev.intx.line.name)


def test_with_irqfd_kvm_asserts_the_line_and_its_eoi_unmasks_through_the_resample_eventfd(realize):
    """vfio_enable_intx_kvm: no interrupt reaches the device's code, so the BAR mmaps stay on and
    a BAR access is no EOI; the guest's EOI in KVM writes the resample eventfd, which unmasks."""
    dev = realize(irqfd=True, x_kvm_intx=True)
    machine, intx = dev.machine, dev.intx
    assert intx.kvm_accel and machine.irqfds[intx.interrupt].resample == intx.unmask >= 0
    log = log_set_irqs(dev)
    raise_through_kvm(dev)
    assert not intx.pending and dev.mmap_enabled()
    dev.bar_write(0, ACK, 1, 4)
    assert intx.line.history == [True], "a BAR access was taken for the EOI"
    assert machine.eoi(intx.line.name) and not intx.line.level
    dev.bar_write(0, RAISE, 1, 4)
    assert machine.run_until(lambda: intx.line.history == [True, False, True], WAIT), \
        "the resample eventfd did not unmask"
    assert UNMASK_IOCTL not in log.calls, "an EOI used the UNMASK ioctl"
    ack_and_eoi(dev)


def test_with_irqfd_a_line_still_high_at_the_eoi_fires_again(realize):
    dev = realize(irqfd=True, x_kvm_intx=True)
    raise_through_kvm(dev)
    dev.machine.eoi(dev.intx.line.name)
    assert dev.machine.run_until(lambda: dev.intx.line.history == [True, False, True], WAIT), \
        "the resampler did not re-fire a still-high line"
    ack_and_eoi(dev)


def test_a_route_the_router_cannot_give_kvm_keeps_intx_in_user_space(realize):
    dev = realize(irqfd=True, x_kvm_intx=True)
    dev.update_irq(None)
    assert not dev.intx.kvm_accel and dev.intx.unmask == -1
    log = log_set_irqs(dev)
    raise_intx(dev)
    dev.bar_write(0, ACK, 1, 4)
    assert UNMASK_IOCTL in log.calls
    raise_intx(dev)
    dev.bar_write(0, ACK, 1, 4)


def test_a_refused_resample_eventfd_falls_back_to_user_space(realize):
    dev = realize(irqfd=True, x_kvm_intx=True)
    log = log_set_irqs(dev, refuse=(UNMASK_EVENTFD,))
    with TraceRecorder() as tr:
        dev.update_irq("gsi 11")
    assert UNMASK_EVENTFD in log.calls and not dev.intx.kvm_accel and dev.intx.unmask == -1
    assert [f["message"] for f in tr.named("error")] == [
        "vfio: Error: Failed to setup INTx unmask fd: Invalid argument"]
    assert not dev.machine.irqfds and dev.machine.has_fd_handler(dev.intx.interrupt)
    assert dev.intx.line is dev.machine.irq_line("gsi 11")
    raise_intx(dev)
    dev.bar_write(0, ACK, 1, 4)
    assert log.calls[-1] == UNMASK_IOCTL
    raise_intx(dev)
    dev.bar_write(0, ACK, 1, 4)


def pending_behind_refused_access(dev):
    """An INTx pending, and BAR0 refusing every pread and pwrite; its region, to give it back."""
    raise_intx(dev)
    region = dev.bars[0].region
    region.host = RefusedAccess(region.host)
    return region


def test_a_failed_trapped_read_is_all_ones_and_ends_nothing(edu):
    """vfio_bar_read returns before its EOI when the pread fails; only a good read ends it."""
    region = pending_behind_refused_access(edu)
    with TraceRecorder() as tr:
        assert edu.bar_read(0, IDENT, 4) == 0xFFFFFFFF and edu.bar_read(0, IDENT, 2) == 0xFFFF
    assert edu.intx.pending and edu.intx.line.history == [True], "a failed read was taken for the EOI"
    assert [f["message"] for f in tr.named("error")] == [
        "vfio_bar_read(BAR0+0x0, 4) failed: Input/output error", "vfio_bar_read(BAR0+0x0, 2) failed: Input/output error"]
    region.host = region.host._host
    assert edu.bar_read(0, IDENT, 4) == 0x010000ED and not edu.intx.pending


def test_a_failed_trapped_write_still_ends_the_interrupt(edu):
    """vfio_bar_write reports the failed pwrite and goes on to the EOI."""
    region = pending_behind_refused_access(edu)
    with TraceRecorder() as tr:
        edu.bar_write(0, ACK, 1, 4)
    assert not edu.intx.pending and edu.intx.line.history == [True, False]
    assert [f["message"] for f in tr.named("error")] == ["vfio_bar_write(BAR0+0x64, 0x1, 4) failed: Input/output error"]
    region.host = region.host._host
    assert edu.machine.run_until(lambda: edu.intx.pending, WAIT), "edu, never acked, did not fire again"


# -- the mmap timer: virtual time only ---------------------------------------------------------
def test_the_fast_path_comes_back_1100_ms_after_the_interrupt(edu):
    raise_intx(edu)
    edu.bar_write(0, ACK, 1, 4)
    assert_fast_path_back_after(edu, 1100)


def test_the_timer_rearms_while_the_interrupt_is_pending(edu):
    raise_intx(edu)
    edu.machine.clock.advance(1100)
    assert not edu.mmap_enabled() and edu.intx.mmap_timer.deadline == 2200
    edu.machine.clock.advance(400)
    edu.bar_write(0, ACK, 1, 4)
    assert_fast_path_back_after(edu, 700)


def test_a_zero_timeout_keeps_the_fast_path_off(realize):
    dev = realize(x_intx_mmap_timeout_ms=0)
    raise_intx(dev)
    dev.bar_write(0, ACK, 1, 4)
    dev.machine.clock.advance(100_000)
    assert not dev.mmap_enabled() and not dev.intx.mmap_timer.pending
