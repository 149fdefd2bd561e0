"""Reset: which devices Linux can reset, what a reset leaves behind, the hot-reset set, the PCI
flavour's reset, and the header vfio-pci saves at open and writes back at the last close."""

import errno

import pytest

from vfio_impl import VFIOError, uapi
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.pci import VFIO_INT_INTX, VFIO_INT_MSI, VFIO_INT_NONE

from ..models import device_config, each
from ..raw import errno_of

COMMAND, CACHE_LINE_SIZE = 0x04, 0x0C
IO, MEM, MASTER, INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
E1000E_RAL0, E1000E_IVAR = 0x5400, 0x00E4
HOT_RESET_INFO = uapi.vfio_pci_hot_reset_info


def device_flags(vfio, d) -> int:
    buf = uapi.vfio_device_info.pack()
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_GET_INFO, buf)
    return uapi.vfio_device_info.unpack(buf).flags


def reset(vfio, d) -> None:
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_RESET, 0)


@each()
def test_device_info_says_whether_reset_works(model, vfio, raw):
    _, _, d = raw.open_device()
    assert device_flags(vfio, d) == uapi.VFIO_DEVICE_FLAGS_PCI | (uapi.VFIO_DEVICE_FLAGS_RESET if model.reset else 0)


@each(destructive=True)
def test_reset_ioctl_works_only_with_a_reset_method(model, vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(reset, vfio, d) == (0 if model.reset else errno.EINVAL)


@each("e1000e", destructive=True)
def test_e1000e_registers_survive_its_pm_reset(model, vfio, raw):
    """Linux resets the 82574L by D3hot and back, which QEMU 7.2's e1000e does not act on."""
    _, _, d = raw.open_device()
    raw.bar_write(d, 0, E1000E_RAL0, 0x12345678)
    raw.bar_write(d, 0, E1000E_IVAR, 0x8A)
    reset(vfio, d)
    assert (raw.bar_read(d, 0, E1000E_RAL0), raw.bar_read(d, 0, E1000E_IVAR)) == (0x12345678, 0x8A)


@each("e1000e", destructive=True)
def test_reset_keeps_the_config_header(model, vfio, raw):
    """The kernel saves the header around the reset: BARs and COMMAND read as before it."""
    _, _, d = raw.open_device()
    raw.enable_device(d, master=True)
    header = [raw.config_read(d, off, 4) for off in range(0, 0x40, 4)]
    reset(vfio, d)
    assert [raw.config_read(d, off, 4) for off in range(0, 0x40, 4)] == header


def _enable_msi(dev) -> None:
    """The guest programs MSI as a driver would: address, data, then the enable bit."""
    pos = dev.msi_cap
    dev.config_write(COMMAND, dev.config_read(COMMAND, 2) | MEM | MASTER, 2)
    dev.config_write(pos + 4, 0xFEE01000, 4)
    dev.config_write(pos + 12, 0x4041, 2)
    dev.config_write(pos + 2, dev.config_read(pos + 2, 2) | 1, 2)


@each(destructive=True)
def test_flavour_reset_quiesces_the_device_then_rewires_intx(model, vfio_pci):
    dev = vfio_pci()
    if dev.msi_cap:
        _enable_msi(dev)
        assert dev.interrupt == VFIO_INT_MSI
    dev.config_write(COMMAND, dev.config_read(COMMAND, 2) | IO | MEM | MASTER | INTX_DISABLE, 2)
    with TraceRecorder() as tr:
        dev.reset()
    assert not device_config(dev, COMMAND, 2) & (IO | MEM | MASTER | INTX_DISABLE)
    assert dev.interrupt == (VFIO_INT_INTX if model.interrupt_pin else VFIO_INT_NONE)
    assert bool(tr.named("vfio_device_reset")) is model.reset, "the reset ioctl goes only to a device that has one"
    assert not tr.named("error")


@each()
def test_hot_reset_info_count_protocol(model, vfio, raw, vfio_device):
    """Asked with room for no device, a bus with a reset answers ENOSPC and the count; the root
    bus has no bus reset to offer."""
    _, _, d = raw.open_device()
    buf = HOT_RESET_INFO.pack(argsz=HOT_RESET_INFO.size)
    on_root_bus = vfio_device.bdf.split(":")[1] == "00"
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf) == (
        errno.ENODEV if on_root_bus else errno.ENOSPC)
    assert HOT_RESET_INFO.unpack(buf).count == (0 if on_root_bus else 1)


@each()
def test_flavour_hot_reset_info_lists_the_bus(model, vfio_pci, vfio_device):
    dev = vfio_pci()
    domain, bus, _ = vfio_device.bdf.split(":")
    if bus == "00":
        with pytest.raises(VFIOError, match="no available reset mechanism") as exc:
            dev.hot_reset_info()
        assert exc.value.errno == errno.ENODEV
    else:
        assert dev.hot_reset_info() == [(vfio_device.group, int(domain, 16), int(bus, 16), 0)]


@each()
def test_last_close_restores_the_header_saved_at_open(model, raw):
    _, g, d = raw.open_device()
    cmd, cls = raw.config_read(d, COMMAND, 2), raw.config_read(d, CACHE_LINE_SIZE, 1)
    raw.config_write(d, COMMAND, 2, (cmd & ~MEM) | MASTER)
    raw.config_write(d, CACHE_LINE_SIZE, 1, cls ^ 0x10)
    changed = (raw.config_read(d, COMMAND, 2), raw.config_read(d, CACHE_LINE_SIZE, 1))
    assert changed == ((cmd & ~MEM) | MASTER, cls ^ 0x10)
    raw.close_fd(d)
    d = raw.device(g)
    assert (raw.config_read(d, COMMAND, 2), raw.config_read(d, CACHE_LINE_SIZE, 1)) == (cmd, cls)
