"""The option ROM: none of the VM's devices has one (romfile= left empty), so the ROM region is
empty; the PCI flavour skips loading it, or emulates a romfile behind the ROM BAR instead."""

import errno

import pytest

from vfio_impl import VFIOError, uapi
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.pci import PCI_ROM_SLOT

from ..models import device_config, each
from ..raw import errno_of

ROM = uapi.VFIO_PCI_ROM_REGION_INDEX
ROM_BAR = 0x30
IMAGE = b"\x55\xaa" + bytes(range(256)) * 11  # 2818 bytes: padded to 4 KiB


def sized_rom_bar(dev) -> int:
    dev.config_write(ROM_BAR, 0xFFFFFFFF, 4)
    return dev.config_read(ROM_BAR, 4)


@each()
def test_rom_region_is_empty(model, raw):
    _, _, d = raw.open_device()
    info, _ = raw.region_info(d, ROM)
    assert (info.flags, info.size, info.offset) == (0, 0, ROM << 40)


@each()
def test_an_empty_rom_refuses_pread_and_pwrite(model, vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.pread, d, 4, ROM << 40) == errno.EINVAL
    assert errno_of(vfio.host.pwrite, d, b"\0" * 4, ROM << 40) == errno.EINVAL


@each()
@pytest.mark.parametrize("rombar", [1, 0])
def test_flavour_skips_loading_an_empty_rom(model, vfio_pci, rombar):
    with TraceRecorder() as tr:
        dev = vfio_pci(rombar=rombar)
    assert not tr.named("vfio_load_rom") and not tr.named("error")
    assert dev.rom is None and sized_rom_bar(dev) == 0


@each()
def test_a_romfile_is_emulated_behind_the_rom_bar(model, vfio_pci, tmp_path):
    """QEMU pads the image to a power of two; the device itself never sees the ROM BAR change."""
    romfile = tmp_path / "option.rom"
    romfile.write_bytes(IMAGE)
    dev = vfio_pci(romfile=str(romfile))
    assert dev.rom == IMAGE.ljust(4096, b"\xff")
    assert sized_rom_bar(dev) == 0xFFFFF001
    assert device_config(dev, ROM_BAR, 4) == 0
    assert dev.bar_read(PCI_ROM_SLOT, 0, 2) == 0xAA55 and dev.bar_read(PCI_ROM_SLOT, 0xFFC, 4) == 0xFFFFFFFF
    assert dev.bar_read(PCI_ROM_SLOT, 2 + 0x41, 1) == 0x41, "the guest does not read the image in the ROM BAR"


@each("edu")
def test_a_romfile_with_rombar_0_is_not_loaded(model, vfio_pci, tmp_path):
    romfile = tmp_path / "option.rom"
    romfile.write_bytes(IMAGE)
    dev = vfio_pci(romfile=str(romfile), rombar=0)
    assert dev.rom is None and sized_rom_bar(dev) == 0


@each("edu")
def test_a_missing_romfile_fails_realize(model, vfio_pci, tmp_path):
    with pytest.raises(VFIOError, match="failed to find romfile") as exc:
        vfio_pci(romfile=str(tmp_path / "absent.rom"))
    assert exc.value.errno == errno.ENOENT
