"""MSI through the PCI flavour: the guest enables it in the emulated capability with its own
address and data, and edu's interrupts reach the machine as that message."""

import pytest

from vfio_impl.flavours.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY

pytestmark = pytest.mark.vfio(device="edu")
FACT, STATUS, STATUS_IRQFACT, RAISE, ACK = 0x08, 0x20, 0x80, 0x60, 0x64
ADDRESS, DATA = 0xFEE01000, 0x4041
WAIT = 2.0


@pytest.fixture
def edu(vfio_pci):
    """edu with memory decode on; acked on the way out, since edu has no reset to clear it on real."""
    dev = vfio_pci(x_kvm_intx=False)
    dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY, 2)
    yield dev
    dev.bar_write(0, ACK, 0xFFFFFFFF, 4)


def bus_master(dev) -> None:
    dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)


def enable_msi(dev, flags=0x1) -> None:
    """What a guest driver writes: address, data, then the enable bit in the flags word."""
    pos = dev.msi_cap
    dev.config_write(pos + 4, ADDRESS, 4)
    dev.config_write(pos + 8, 0, 4)
    dev.config_write(pos + 12, DATA, 2)
    dev.config_write(pos + 2, flags, 2)


def delivered(dev) -> bool:
    return dev.machine.run_until(lambda: dev.machine.msi_messages, WAIT)


def test_the_guests_enable_write_raises_msi_with_the_programmed_message(edu):
    bus_master(edu)
    enable_msi(edu)
    assert edu.interrupt == "msi" and edu.config_read(edu.msi_cap + 2, 2) & 1
    edu.bar_write(0, RAISE, 1, 4)
    assert delivered(edu), "edu's MSI never reached the machine"
    assert edu.machine.msi_messages == [(ADDRESS, DATA)]
    assert not edu.intx.line.history, "an MSI also asserted the INTx line"


def test_with_irqfd_the_vector_goes_to_a_kvm_route_to_its_message(vfio_pci):
    """vfio_enable_msi's KVM path: the eventfd is an irqfd on a route to the programmed message,
    so the interrupt reaches the guest with no handler of the device in between."""
    dev = vfio_pci(irqfd=True)
    try:
        bus_master(dev)
        enable_msi(dev)
        (vector,) = dev.msi_vectors
        irqfd = dev.machine.irqfds[vector.fd]
        assert (irqfd.gsi.address, irqfd.gsi.data) == (ADDRESS, DATA) and not dev.machine.has_fd_handler(vector.fd)
        dev.bar_write(0, RAISE, 1, 4)
        assert delivered(dev) and dev.machine.msi_messages == [(ADDRESS, DATA)]
        dev.config_write(dev.msi_cap + 2, 0, 2)
        assert not dev.machine.msi_routes
    finally:
        dev.bar_write(0, ACK, 0xFFFFFFFF, 4)


def test_edu_factorial_completes_with_an_msi(edu):
    """edu computes in a thread on real: the completion interrupt is how a driver knows."""
    bus_master(edu)
    enable_msi(edu)
    edu.bar_write(0, STATUS, STATUS_IRQFACT, 4)
    edu.bar_write(0, FACT, 10, 4)
    assert delivered(edu), "the factorial's completion interrupt never came"
    assert edu.bar_read(0, FACT, 4) == 3628800
    assert edu.machine.msi_messages == [(ADDRESS, DATA)]
    edu.bar_write(0, STATUS, 0, 4)


def test_msi_needs_bus_master(edu):
    """An MSI is a memory write by the device: without bus master it never leaves edu."""
    enable_msi(edu)
    edu.bar_write(0, RAISE, 1, 4)
    assert not edu.machine.run_until(lambda: edu.machine.msi_messages, 0.2)
    bus_master(edu)
    edu.bar_write(0, RAISE, 1, 4)
    assert delivered(edu) and edu.machine.msi_messages[-1] == (ADDRESS, DATA)


def test_a_vector_count_beyond_the_devices_is_clamped(edu):
    """edu offers one vector; a guest asking for 128 gets one once MSI is on, and it works.
    While MSI is off the count reads back as written, as QEMU's msi.c leaves it."""
    bus_master(edu)
    edu.config_write(edu.msi_cap + 2, 0x70, 2)
    assert edu.config_read(edu.msi_cap + 2, 2) & 0x70 == 0x70
    enable_msi(edu, flags=0x70 | 0x1)
    assert edu.config_read(edu.msi_cap + 2, 2) & 0x70 == 0 and edu.nr_vectors == 1
    edu.bar_write(0, RAISE, 1, 4)
    assert delivered(edu) and edu.machine.msi_messages == [(ADDRESS, DATA)]


def test_disabling_msi_in_config_returns_to_intx(edu):
    bus_master(edu)
    enable_msi(edu)
    edu.config_write(edu.msi_cap + 2, 0, 2)
    assert edu.interrupt == "intx" and edu.msi_vectors == []
    edu.bar_write(0, RAISE, 1, 4)
    assert edu.machine.run_until(lambda: edu.intx.pending, WAIT), "INTx did not come back after MSI"
    assert edu.intx.line.level and edu.machine.msi_messages == []
