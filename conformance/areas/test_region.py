"""Regions: info, config space virtualization, BAR access by pread and by mmap, limits."""

import errno
import mmap

import pytest

from vfio_impl import AddressSpace, Device, uapi

from ..raw import errno_of

pytestmark = pytest.mark.vfio(device="edu")
RW = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
EDU_ID = 0x010000ED


def test_bar0_info(vfio, raw):
    _, _, d = raw.open_device()
    info, _ = raw.region_info(d, 0)
    assert (info.flags, info.size, info.offset) == (RW | uapi.VFIO_REGION_INFO_FLAG_MMAP, 1 << 20, 0)


@pytest.mark.parametrize("index", [1, 2, 3, 4, 5, uapi.VFIO_PCI_ROM_REGION_INDEX])
def test_absent_bars_are_empty(vfio, raw, index):
    _, _, d = raw.open_device()
    info, _ = raw.region_info(d, index)
    assert (info.flags, info.size, info.offset) == (0, 0, index << 40)


def test_config_region_info(vfio, raw):
    _, _, d = raw.open_device()
    info, _ = raw.region_info(d, uapi.VFIO_PCI_CONFIG_REGION_INDEX)
    assert (info.flags, info.size) == (RW, 256)


@pytest.mark.parametrize("index", [uapi.VFIO_PCI_VGA_REGION_INDEX, uapi.VFIO_PCI_NUM_REGIONS])
def test_region_info_of_missing_indexes(vfio, raw, index):
    _, _, d = raw.open_device()
    assert errno_of(raw.region_info, d, index) == errno.EINVAL


def test_region_info_argsz_too_small(vfio, raw):
    _, _, d = raw.open_device()
    buf = uapi.vfio_region_info.pack(argsz=31)
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_GET_REGION_INFO, buf) == errno.EINVAL


def test_config_identity(vfio, raw):
    _, _, d = raw.open_device()
    assert raw.config_read(d, 0, 4) == 0x11E81234
    assert raw.config_read(d, 0x3D, 1) == 1


def test_config_read_past_the_end(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.pread, d, 4, (7 << 40) + 254) == errno.EFAULT


def test_bar_pread_identification(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d)
    assert raw.bar_read(d, 0, 0) == EDU_ID


def test_bar_decodes_right_after_open(vfio, raw):
    """The function was enabled before vfio-pci handed it out: BARs decode, bus master is off."""
    _, _, d = raw.open_device()
    cmd = raw.config_read(d, 4, 2)
    assert cmd & 0x2 and not cmd & 0x4
    assert raw.config_read(d, 0x10, 4) & 0xFFF00000
    assert raw.bar_read(d, 0, 0) == EDU_ID


def test_bar_read_past_the_end(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d)
    assert errno_of(vfio.host.pread, d, 4, 1 << 20) == errno.EINVAL


def test_bar_read_across_the_end_is_short(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d)
    assert len(vfio.host.pread(d, 8, (1 << 20) - 4)) == 4


def test_read_of_an_index_without_region(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.pread, d, 4, uapi.VFIO_PCI_NUM_REGIONS << 40) == errno.EINVAL


def test_bar_access_needs_memory_decode(vfio, raw):
    _, _, d = raw.open_device()
    cmd = raw.config_read(d, 4, 2)
    raw.config_write(d, 4, 2, cmd & ~0x2)
    assert errno_of(vfio.host.pread, d, 4, 0) == errno.EIO
    raw.config_write(d, 4, 2, cmd | 0x2)
    assert raw.bar_read(d, 0, 0) == EDU_ID


def test_liveness_register_by_pwrite(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d)
    raw.bar_write(d, 0, 4, 0x12345678)
    assert raw.bar_read(d, 0, 4) == 0xEDCBA987


def test_factorial_by_pwrite(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d)
    raw.bar_write(d, 0, 8, 5)
    while raw.bar_read(d, 0, 0x20) & 1:
        pass
    assert raw.bar_read(d, 0, 8) == 120


def test_mmap_bar0(vfio, raw):
    _, _, d = raw.open_device()
    raw.enable_device(d)
    m = vfio.host.mmap(d, 1 << 20, 0)
    try:
        assert int.from_bytes(m[0:4], "little") == EDU_ID
        m[4:8] = (0x0F0F0F0F).to_bytes(4, "little")
        assert int.from_bytes(m[4:8], "little") == 0xF0F0F0F0
    finally:
        m.close()


@pytest.mark.parametrize("index", [uapi.VFIO_PCI_CONFIG_REGION_INDEX, uapi.VFIO_PCI_ROM_REGION_INDEX, 1])
def test_mmap_refused(vfio, raw, index):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.mmap, d, mmap.PAGESIZE, index << 40) == errno.EINVAL


def test_mmap_beyond_the_bar(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.mmap, d, 2 << 20, 0) == errno.EINVAL


def test_rom_is_read_only(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.pwrite, d, b"\0" * 4, uapi.VFIO_PCI_ROM_REGION_INDEX << 40) == errno.EINVAL


def test_region_fast_path_switch(vfio, vfio_device):
    """The same register reads the same through the mmap and through the trapped path."""
    with AddressSpace(vfio.host) as space:
        dev = Device.attach(space, vfio_device.sysfs)
        cfg = dev.region(uapi.VFIO_PCI_CONFIG_REGION_INDEX)
        cfg.write(4, cfg.read(4, 2) | 0x2, 2)
        bar = dev.region(0)
        bar.mmap()
        assert bar.areas and bar.read(0, 4) == EDU_ID
        bar.write(4, 1, 4)
        bar.mmap_enabled = False
        assert bar.read(4, 4) == 0xFFFFFFFE
        bar.mmap_enabled = True
        dev.close()
