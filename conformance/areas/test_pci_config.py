"""Config space as vfio-pci virtualizes it (vfio_pci_config.c), seen raw through the config region
and as a guest sees it through the PCI flavour, which emulates the ROM BAR and MSI/MSI-X."""

import errno

import pytest

from vfio_impl import uapi
from vfio_impl.core import irq

from ..models import access, bar_of, device_config, each, walk_caps  # noqa: F401 (access is a fixture)
from ..raw import errno_of

COMMAND, STATUS, HEADER_TYPE, ROM_BAR = 0x04, 0x06, 0x0E, 0x30
IO, MEM, MASTER, INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
MSI_64BIT, MSI_MASKBIT = 0x80, 0x100
MSIX_MASKALL = 0x4000


@each()
def test_bar_sizing_reads_back_the_size_and_type_then_restores(model, access):
    """Writing all ones is how a driver sizes a BAR; vfio-pci answers from the BAR's real size."""
    for index in range(6):
        off = 0x10 + 4 * index
        old = access.config_read(off, 4)
        access.config_write(off, 4, 0xFFFFFFFF)
        sized = access.config_read(off, 4)
        access.config_write(off, 4, old)
        assert (index, sized) == (index, bar_of(model, index)[2])
        assert access.config_read(off, 4) == old


@each()
def test_rom_bar_sizes_to_zero_without_a_rom(model, access):
    access.config_write(ROM_BAR, 4, 0xFFFFFFFF)
    assert access.config_read(ROM_BAR, 4) == 0


@each()
def test_identity_and_class_ignore_writes(model, access):
    access.config_write(0x00, 4, 0xFFFFFFFF)
    access.config_write(0x08, 4, 0xFFFFFFFF)
    assert (access.config_read(0x00, 4), access.config_read(0x08, 4)) == (model.ids, model.class_rev)


@each()
def test_command_decode_and_master_bits_are_writable(model, access):
    cmd, bits = access.config_read(COMMAND, 2), IO | MEM | MASTER
    access.config_write(COMMAND, 2, cmd & ~bits)
    cleared = access.config_read(COMMAND, 2)
    access.config_write(COMMAND, 2, cmd | bits)
    assert (cleared & bits, access.config_read(COMMAND, 2) & bits) == (0, bits)


@each("edu")
def test_intx_disable_reads_as_the_user_wrote_it_not_as_the_kernel_masks(model, raw, vfio):
    """vfio-pci masks an automasked INTx with the hardware bit; the user's COMMAND hides that."""
    _, _, d = raw.open_device()
    raw.enable_device(d)
    efd = raw.eventfd()
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(uapi.VFIO_PCI_INTX_IRQ_INDEX, 0, [efd]))
    raw.bar_write(d, 0, 0x60, 1)
    try:
        assert raw.config_read(d, STATUS, 2) & 0x8, "edu did not assert INTx"
        assert not raw.config_read(d, COMMAND, 2) & INTX_DISABLE
        raw.config_write(d, COMMAND, 2, raw.config_read(d, COMMAND, 2) | INTX_DISABLE)
        assert raw.config_read(d, COMMAND, 2) & INTX_DISABLE
    finally:
        raw.bar_write(d, 0, 0x64, 1)


@each()
def test_status_capability_bit_follows_the_list(model, access):
    assert bool(access.config_read(STATUS, 2) & 0x10) == bool(model.caps)


@each()
def test_capability_chain_matches_the_device(model, access):
    """The flavour rebuilds the chain from the end, each at the head: the order must come out the same."""
    assert walk_caps(access.config_read) == list(model.caps)


@each()
def test_config_region_size_and_its_end(model, raw, vfio):
    _, _, d = raw.open_device()
    info, _ = raw.region_info(d, uapi.VFIO_PCI_CONFIG_REGION_INDEX)
    assert info.size == model.config_size
    assert len(vfio.host.pread(d, 4, info.offset + model.config_size - 4)) == 4
    assert errno_of(vfio.host.pread, d, 4, info.offset + model.config_size) == errno.EFAULT


@each("e1000e")
def test_extended_capabilities_from_0x100(model, raw):
    _, _, d = raw.open_device()
    chain, pos = [], 0x100
    while pos and len(chain) < 16:
        header = raw.config_read(d, pos, 4)
        chain.append((pos, header & 0xFFFF, (header >> 16) & 0xF))
        pos = header >> 20
    assert chain == list(model.ext_caps)


@each("e1000e")
def test_guest_config_space_is_conventional(model, vfio_pci):
    """The early flavour models 256 bytes; what lies beyond reads as no device."""
    dev = vfio_pci()
    assert dev.config_read(0x100, 4) == 0xFFFFFFFF
    assert device_config(dev, 0x100, 4) & 0xFFFF == model.ext_caps[0][1]


@each()
@pytest.mark.parametrize("multifunction", [False, True])
def test_multifunction_bit_is_the_flavours(model, vfio_pci, multifunction):
    dev = vfio_pci(multifunction=multifunction)
    assert device_config(dev, HEADER_TYPE, 1) == 0
    expect = 0x80 if multifunction else 0
    assert dev.config_read(HEADER_TYPE, 1) == expect
    assert dev.config_read(0x0C, 4) >> 16 & 0xFF == expect


@each()
def test_guest_header_reads_come_from_the_device(model, vfio_pci):
    """Outside the ROM BAR and the MSI/MSI-X capabilities the guest reads what vfio-pci answers."""
    dev = vfio_pci()
    for off in range(0, 0x40, 4):
        if off != ROM_BAR:
            assert (off, dev.config_read(off, 4)) == (off, device_config(dev, off, 4))


@each("e1000e")
def test_msix_control_written_by_the_guest_stays_in_the_emulation(model, vfio_pci):
    """vfio-pci drops user writes to MSI-X control; the guest's function mask lives in the flavour."""
    dev = vfio_pci()
    pos = dict((cap_id, off) for off, cap_id in model.caps)[0x11]
    before = device_config(dev, pos + 2, 2)
    dev.config_write(pos + 2, dev.config_read(pos + 2, 2) | MSIX_MASKALL, 2)
    assert dev.config_read(pos + 2, 2) & MSIX_MASKALL
    assert device_config(dev, pos + 2, 2) == before
    assert [dev.config_read(pos + off, 4) for off in (4, 8)] == [device_config(dev, pos + off, 4) for off in (4, 8)]


@each("edu", "e1000e")
def test_msi_capability_size_follows_its_flags(model, vfio_pci):
    """Ten bytes, four more for a 64-bit address, ten more for mask and pending bits."""
    dev = vfio_pci()
    pos = dict((cap_id, off) for off, cap_id in model.caps)[0x05]
    flags = device_config(dev, pos + 2, 2)
    assert flags & (MSI_64BIT | MSI_MASKBIT) == MSI_64BIT
    assert (dev.msi_cap, dev.msi_cap_size) == (pos, 14)
