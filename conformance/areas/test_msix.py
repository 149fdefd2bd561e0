"""MSI-X through the PCI flavour on e1000e: the guest sets the enable bit in config and programs
the table in the BAR3 hole the flavour emulates; the NIC raises a cause that IVAR routes to a
vector, and the message the guest programmed reaches the machine."""

import errno

import pytest

from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.flavours.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY

pytestmark = pytest.mark.vfio(device="e1000e")
MSIX = uapi.VFIO_PCI_MSIX_IRQ_INDEX
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


@pytest.fixture
def nic(vfio_pci):
    dev = vfio_pci(x_kvm_intx=False)
    dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
    quiesce(dev)
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


def accepts(dev, vector: int) -> bool:
    """A false DATA_BOOL trigger: EINVAL beyond the kernel's vectors, and it fires nothing."""
    try:
        dev.vbasedev.set_irqs(irq.data_bool(MSIX, vector, [False], uapi.VFIO_IRQ_SET_ACTION_TRIGGER))
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    return True


def kernel_vectors(dev) -> int:
    """How many MSI-X vectors the kernel has enabled."""
    return next(nr for nr in range(dev.msix.entries + 1) if not accepts(dev, nr))


def test_enabling_msix_leaves_one_kernel_vector_and_none_in_use(nic):
    """The seed uses vector 0 and releases it at once: MSI-X on, no vector wired."""
    msix_control(nic, ENABLE)
    assert nic.interrupt == "msix" and nic.nr_vectors == 1
    assert not any(v.use for v in nic.msix_vectors) and nic.vbasedev.eventfds == set()
    assert kernel_vectors(nic) == 1


def test_a_device_raised_vector_reaches_the_machine_with_the_programmed_message(nic):
    msix_control(nic, ENABLE)
    program(nic, 0)
    raise_cause(nic, rxq0_to(0), RXQ0)
    assert messages(nic, 1) == [(ADDRESS, DATA)]
    assert not nic.intx.line.history


def test_vectors_grow_one_index_at_a_time(nic):
    """Each vector past the last disables MSI-X and enables it again with one more, passing the
    earlier vectors' eventfds again: vector 1 still works after vector 3 came."""
    msix_control(nic, ENABLE)
    program(nic, 1)
    assert nic.nr_vectors == kernel_vectors(nic) == 2
    program(nic, 3)
    assert nic.nr_vectors == kernel_vectors(nic) == 4
    raise_cause(nic, rxq0_to(1) | txq0_to(3), RXQ0 | TXQ0)
    assert messages(nic, 2) == [(ADDRESS, DATA + 1), (ADDRESS, DATA + 3)]


def test_masking_a_vector_releases_it_and_the_device_holds_what_it_raised(nic):
    """A released vector is masked in the device, whose PBA keeps the interrupt for the unmask."""
    msix_control(nic, ENABLE)
    program(nic, 1)
    program(nic, 1, masked=True)
    vector = nic.msix_vectors[1]
    assert not vector.use and vector.fd == -1 and nic.vbasedev.eventfds == set()
    raise_cause(nic, rxq0_to(1), RXQ0)
    assert not nic.machine.run_until(lambda: nic.machine.msi_messages, 0.2)
    program(nic, 1)
    assert vector.use and vector.fd >= 0
    assert messages(nic, 1) == [(ADDRESS, DATA + 1)]


def test_the_function_mask_releases_every_vector_until_cleared(nic):
    msix_control(nic, ENABLE)
    program(nic, 0)
    program(nic, 2)
    msix_control(nic, ENABLE | MASKALL)
    assert not any(v.use for v in nic.msix_vectors) and nic.vbasedev.eventfds == set()
    msix_control(nic, ENABLE)
    assert [v.nr for v in nic.msix_vectors if v.use] == [0, 2]
    raise_cause(nic, rxq0_to(2), RXQ0)
    assert messages(nic, 1) == [(ADDRESS, DATA + 2)]


def test_disabling_msix_tears_it_down_and_returns_to_intx(nic):
    msix_control(nic, ENABLE)
    program(nic, 0)
    program(nic, 3)
    msix_control(nic, 0)
    assert nic.interrupt == "intx" and nic.msix_vectors == [] and nic.nr_vectors == 0
    assert nic.vbasedev.eventfds == {nic.intx.interrupt} and kernel_vectors(nic) == 0
    raise_cause(nic, rxq0_to(0), RXQ0)
    assert nic.machine.run_until(lambda: nic.intx.pending, WAIT), "INTx did not come back after MSI-X"
    assert nic.machine.msi_messages == []
