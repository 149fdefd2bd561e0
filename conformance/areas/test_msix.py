"""MSI-X through the PCI flavour on e1000e: the guest sets the enable bit in config and programs
the table in the BAR3 hole the flavour emulates; the NIC raises a cause that IVAR routes to a
vector, and the message the guest programmed reaches the machine."""

import pytest

from vfio_impl.flavours.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY

from ..raw import wired_vectors

pytestmark = pytest.mark.vfio(device="e1000e")
ENABLE, MASKALL = 0x8000, 0x4000
ICR, ICS, IMS, IMC, EIAC, IVAR = 0xC0, 0xC8, 0xD0, 0xD8, 0xDC, 0xE4
RXQ0, TXQ0, OTHER = 0x00100000, 0x00400000, 0x01000000
IVAR_VALID = 0x8
ADDRESS, DATA = 0xFEE00000, 0x4060
WAIT = 2.0


def quiesce(dev) -> None:
    """QEMU's e1000e ignores the PM reset Linux uses, so its registers outlive the test on real."""
    for reg, value in ((IMC, 0xFFFFFFFF), (EIAC, 0), (IVAR, 0), (ICR, 0xFFFFFFFF)):
        dev.bar_write(0, reg, value, 4)


def realize_nic(vfio_pci, **options):
    dev = vfio_pci(x_kvm_intx=False, **options)
    dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
    quiesce(dev)
    return dev


@pytest.fixture
def nic(vfio_pci):
    dev = realize_nic(vfio_pci)
    yield dev
    quiesce(dev)


def msix_control(dev, value: int) -> None:
    dev.config_write(dev.msix.cap + 2, value, 2)


def program(dev, nr: int, masked: bool = False) -> None:
    """Table entry nr as a guest writes it; data carries the vector number to tell them apart."""
    base = dev.msix.table_offset + 16 * nr
    for off, value in ((0, ADDRESS), (4, 0), (8, DATA + nr), (12, int(masked))):
        dev.bar_write(dev.msix.table_bar, base + off, value, 4)


def raise_cause(dev, ivar: int, cause: int) -> None:
    """IMS has OTHER as well: the 82574L sends every cause but the queues' as OTHER under MSI-X."""
    dev.bar_write(0, IVAR, ivar, 4)
    dev.bar_write(0, IMS, cause | OTHER, 4)
    dev.bar_write(0, ICS, cause, 4)


def rxq0_to(vector: int) -> int:
    """IVAR's RXQ0 field (bits 0-3): valid bit and vector."""
    return IVAR_VALID | vector


def txq0_to(vector: int) -> int:
    """IVAR's TXQ0 field (bits 8-11)."""
    return (IVAR_VALID | vector) << 8


def messages(dev, count: int) -> list:
    machine = dev.machine
    assert machine.run_until(lambda: len(machine.msi_messages) >= count, WAIT), "an MSI-X vector never arrived"
    return sorted(machine.msi_messages)


def kernel_vectors(dev) -> set[int]:
    """The MSI-X vectors the kernel has wired to an eventfd, from /proc/interrupts, where it lists
    each one's handler: the kernel's own answer on 6.1 and 6.12 alike. (Triggering vectors until
    EINVAL counts the vectors enabled on 6.1 only; 6.12 takes a trigger for any of the table.)"""
    return wired_vectors(dev.host, dev.name, "msix")


def msix_on_in_the_device(dev) -> bool:
    """The function's own MSI-X Enable, which vfio-pci reads from the hardware: the kernel sets it
    when it enables MSI-X."""
    return bool(int.from_bytes(dev.config_region.pread(dev.msix.cap + 2, 2), "little") & ENABLE)


def test_enabling_msix_turns_it_on_with_no_vector_wired(nic):
    """The guest sees MSI-X on and no vector in use, and so it is in the kernel and the device."""
    msix_control(nic, ENABLE)
    assert nic.interrupt == "msix"
    assert not any(v.use for v in nic.msix_vectors) and nic.vbasedev.eventfds == set()
    assert msix_on_in_the_device(nic) and kernel_vectors(nic) == set()


def test_a_device_raised_vector_reaches_the_machine_with_the_programmed_message(nic):
    msix_control(nic, ENABLE)
    program(nic, 0)
    raise_cause(nic, rxq0_to(0), RXQ0)
    assert messages(nic, 1) == [(ADDRESS, DATA)]
    assert not nic.intx.line.history


def test_with_irqfd_a_vector_goes_to_a_kvm_route_until_masked(vfio_pci):
    """vfio_msix_vector_do_use's KVM path, and its release: the route goes with the mask."""
    nic = realize_nic(vfio_pci, irqfd=True)
    try:
        msix_control(nic, ENABLE)
        program(nic, 1)
        vector = nic.msix_vectors[1]
        irqfd = nic.machine.irqfds[vector.fd]
        assert (irqfd.gsi.address, irqfd.gsi.data) == (ADDRESS, DATA + 1) and not nic.machine.has_fd_handler(vector.fd)
        raise_cause(nic, rxq0_to(1), RXQ0)
        assert messages(nic, 1) == [(ADDRESS, DATA + 1)]
        program(nic, 1, masked=True)
        assert vector.virq is None and not nic.machine.msi_routes and kernel_vectors(nic) == set()
    finally:
        quiesce(nic)


def test_vectors_grow_one_index_at_a_time(nic):
    """A vector past the last raises nr_vectors to it and the kernel wires just the vectors in use;
    vector 1 still works after vector 3 came, whether MSI-X went off and on to add it (NORESIZE,
    on 6.1) or not."""
    msix_control(nic, ENABLE)
    program(nic, 1)
    assert nic.nr_vectors == 2 and kernel_vectors(nic) == {1}
    program(nic, 3)
    assert nic.nr_vectors == 4 and kernel_vectors(nic) == {1, 3}
    raise_cause(nic, rxq0_to(1) | txq0_to(3), RXQ0 | TXQ0)
    assert messages(nic, 2) == [(ADDRESS, DATA + 1), (ADDRESS, DATA + 3)]


def test_masking_a_vector_releases_it_and_the_device_holds_what_it_raised(nic):
    """A released vector is masked in the device, whose PBA keeps the interrupt for the unmask."""
    msix_control(nic, ENABLE)
    program(nic, 1)
    program(nic, 1, masked=True)
    vector = nic.msix_vectors[1]
    assert not vector.use and vector.fd == -1 and nic.vbasedev.eventfds == set() and kernel_vectors(nic) == set()
    raise_cause(nic, rxq0_to(1), RXQ0)
    assert not nic.machine.run_until(lambda: nic.machine.msi_messages, 0.2)
    program(nic, 1)
    assert vector.use and vector.fd >= 0 and kernel_vectors(nic) == {1}
    assert messages(nic, 1) == [(ADDRESS, DATA + 1)]


def test_the_function_mask_releases_every_vector_until_cleared(nic):
    msix_control(nic, ENABLE)
    program(nic, 0)
    program(nic, 2)
    msix_control(nic, ENABLE | MASKALL)
    assert not any(v.use for v in nic.msix_vectors) and nic.vbasedev.eventfds == set() and kernel_vectors(nic) == set()
    msix_control(nic, ENABLE)
    assert [v.nr for v in nic.msix_vectors if v.use] == [0, 2] and kernel_vectors(nic) == {0, 2}
    raise_cause(nic, rxq0_to(2), RXQ0)
    assert messages(nic, 1) == [(ADDRESS, DATA + 2)]


def test_disabling_msix_tears_it_down_and_returns_to_intx(nic):
    msix_control(nic, ENABLE)
    program(nic, 0)
    program(nic, 3)
    msix_control(nic, 0)
    assert nic.interrupt == "intx" and nic.msix_vectors == [] and nic.nr_vectors == 0
    assert nic.vbasedev.eventfds == {nic.intx.interrupt} and kernel_vectors(nic) == set()
    assert not msix_on_in_the_device(nic)
    raise_cause(nic, rxq0_to(0), RXQ0)
    assert nic.machine.run_until(lambda: nic.intx.pending, WAIT), "INTx did not come back after MSI-X"
    assert nic.machine.msi_messages == []


RXQ1 = 0x00200000


def rxq1_to(vector: int) -> int:
    """IVAR's RXQ1 field (bits 4-7)."""
    return (IVAR_VALID | vector) << 4


def test_the_kernel_wires_one_more_vector_as_each_is_used(nic):
    """Vectors 0, then 1 and 2: after each the kernel has wired exactly the vectors in use, whether
    it took MSI-X off and on again with vectors 0..n-1 (NORESIZE, 6.1) or added the new one alone
    (dynamic MSI-X, 6.12); then the device raises a cause on each, and every message arrives."""
    msix_control(nic, ENABLE)
    assert kernel_vectors(nic) == set()
    program(nic, 0)
    assert kernel_vectors(nic) == {0}
    program(nic, 1)
    assert kernel_vectors(nic) == {0, 1}
    program(nic, 2)
    assert kernel_vectors(nic) == {0, 1, 2} and nic.nr_vectors == 3
    raise_cause(nic, rxq0_to(0) | txq0_to(1) | rxq1_to(2), RXQ0 | TXQ0 | RXQ1)
    assert messages(nic, 3) == [(ADDRESS, DATA), (ADDRESS, DATA + 1), (ADDRESS, DATA + 2)]
