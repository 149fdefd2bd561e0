"""Dynamic MSI-X, as QEMU does it since 8.1: the flavour reads VFIO_IRQ_INFO_NORESIZE from the MSI-X
IRQ info at realize. With it (Linux 6.1) a newly used vector past the enabled ones turns MSI-X off
and on again with one vector more, as the seed does; without it (6.12) the new vector is one
SET_IRQS on its own subindex and MSI-X stays on. The kernel calls are the fake's record of them."""

import errno

import pytest

from fakekernel import FakeKernel, Topology
from fakekernel.faults import Fault
from fakekernel.topology import PciDeviceSpec
from vfio_impl import AddressSpace, Machine, VirtualClock, uapi
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.pci import (
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    VFIOPCIDevice,
)

E1000E = "0000:01:00.0"
INTX, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX
ENABLE = 0x8000
ADDRESS, DATA = 0xFEE00000, 0x4060
SET_MSIX = "ioctl VFIO_DEVICE_SET_IRQS index=2 "
DISABLE = SET_MSIX + "start=0 count=0 TRIGGER NONE"


def eventfds(start: int, count: int) -> str:
    return SET_MSIX + f"start={start} count={count} TRIGGER EVENTFD"


@pytest.fixture
def kernel(profile):
    with FakeKernel(Topology([PciDeviceSpec(E1000E, "e1000e", 9)], "e1000e"), profile) as k:
        yield k


@pytest.fixture
def nic(kernel):
    with AddressSpace(kernel, Machine(VirtualClock())) as space, \
            VFIOPCIDevice.realize(space, space.machine, host=E1000E, x_kvm_intx=False) as dev:
        dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
        yield dev


def msix_control(dev, value: int) -> None:
    dev.config_write(dev.msix.cap + 2, value, 2)


def unmask(dev, nr: int) -> None:
    """Table entry nr as a guest writes it, the vector control word (the unmask) last."""
    base = dev.msix.table_offset + 16 * nr
    for off, value in ((0, ADDRESS), (4, 0), (8, DATA + nr), (12, 0)):
        dev.bar_write(dev.msix.table_bar, base + off, value, 4)


def msix_calls(kernel, action, *args) -> list[str]:
    """The MSI-X SET_IRQS calls `action(*args)` makes."""
    with kernel.faults.record() as calls:
        action(*args)
    return [c.name for c in calls if c.name.startswith(SET_MSIX)]


def fire(dev, *vectors: int) -> list[tuple[int, int]]:
    """Each vector's loopback trigger, and the messages the machine receives for them."""
    for nr in vectors:
        dev.vbasedev.trigger_irq(MSIX, nr)
    machine = dev.machine
    assert machine.run_until(lambda: len(machine.msi_messages) >= len(vectors), 2.0), "a vector never arrived"
    return sorted(machine.msi_messages)


@pytest.mark.parametrize(("profile", "noresize"), [("6.1", True), ("6.12", False)])
def test_noresize_is_what_the_kernels_msix_irq_info_says(kernel, noresize):
    with AddressSpace(kernel, Machine(VirtualClock())) as space:
        with kernel.faults.record() as calls:
            dev = VFIOPCIDevice.realize(space, space.machine, host=E1000E, x_kvm_intx=False)
        with dev:
            assert [c.name for c in calls].count("ioctl VFIO_DEVICE_GET_IRQ_INFO index=2") == 1
            flags = dev.vbasedev.get_irq_info(MSIX).flags
            assert dev.msix.noresize is noresize is bool(flags & uapi.VFIO_IRQ_INFO_NORESIZE)


@pytest.mark.parametrize("profile", ["6.1"])
def test_with_noresize_each_new_vector_disables_and_reenables_msix(kernel, nic):
    """The seed: vector 0 used and released at enable, then vectors 0..nr-1 passed again."""
    assert msix_calls(kernel, msix_control, nic, ENABLE) == [DISABLE, eventfds(0, 1), eventfds(0, 1)]
    assert msix_calls(kernel, unmask, nic, 0) == [eventfds(0, 1)]
    assert msix_calls(kernel, unmask, nic, 1) == [DISABLE, eventfds(0, 2)]
    assert msix_calls(kernel, unmask, nic, 2) == [DISABLE, eventfds(0, 3)]
    assert nic.nr_vectors == 3
    assert fire(nic, 0, 1, 2) == [(ADDRESS, DATA), (ADDRESS, DATA + 1), (ADDRESS, DATA + 2)]


@pytest.mark.parametrize("profile", ["6.12"])
def test_without_noresize_a_new_vector_is_one_set_irqs_on_its_subindex(kernel, nic):
    """MSI-X on with vector 0's fd -1 (vfio_enable_msix_no_vec), then one SET_IRQS a vector, never
    a disable: vector 0 keeps working while 1 and 2 come."""
    assert msix_calls(kernel, msix_control, nic, ENABLE) == [eventfds(0, 1)]
    assert nic.interrupt == "msix" and nic.nr_vectors == 0 and nic.vbasedev.eventfds == set()
    for nr in range(3):
        assert msix_calls(kernel, unmask, nic, nr) == [eventfds(nr, 1)]
    assert nic.nr_vectors == 3
    assert fire(nic, 0, 1, 2) == [(ADDRESS, DATA), (ADDRESS, DATA + 1), (ADDRESS, DATA + 2)]


@pytest.mark.parametrize(("profile", "expected"), [
    ("6.1", [DISABLE, eventfds(0, 1), eventfds(0, 1), DISABLE, eventfds(0, 4)]),
    ("6.12", [eventfds(0, 1), eventfds(3, 1)]),
])
def test_a_vector_unmasked_before_enable(kernel, nic, expected):
    """Without NORESIZE, MSI-X goes on with no vector before the notifiers use vector 3: a first
    SET_IRQS at subindex 3 on an index still off would have the kernel allocate vectors 0..3."""
    unmask(nic, 3)
    assert msix_calls(kernel, msix_control, nic, ENABLE) == expected
    assert [v.nr for v in nic.msix_vectors if v.use] == [3] and nic.nr_vectors == 4
    assert fire(nic, 3) == [(ADDRESS, DATA + 3)]


@pytest.mark.parametrize("profile", ["6.1", "6.12"])
def test_disabling_msix_with_no_vector_used_clears_the_index_and_intx_returns(kernel, nic):
    """On 6.12 nr_vectors is 0 here, yet the kernel has MSI-X on: the index is cleared all the
    same (QEMU d2b668fca565), or the kernel would refuse INTx's trigger."""
    msix_control(nic, ENABLE)
    with TraceRecorder() as tr:
        assert DISABLE in msix_calls(kernel, msix_control, nic, 0)
    assert tr.named("error") == [] and nic.interrupt == "intx"
    assert kernel.vfio_devices[E1000E].irq_type == INTX


@pytest.mark.parametrize("profile", ["6.12"])
def test_without_noresize_failures_are_reported_in_qemus_words(kernel, nic):
    def fails(call: str) -> Fault:
        return Fault("ioctl", request="VFIO_DEVICE_SET_IRQS", errno=errno.EIO, when=lambda c: c.name == call)

    with TraceRecorder() as tr, kernel.faults.inject(fails(eventfds(0, 1))):
        msix_control(nic, ENABLE)
    assert [f["message"] for f in tr.named("error")] == ["vfio: failed to enable MSI-X, -5"]
    with TraceRecorder() as tr, kernel.faults.inject(fails(eventfds(1, 1))):
        unmask(nic, 1)
    assert [f["message"] for f in tr.named("error")] == ["vfio: failed to modify vector, -5"]
