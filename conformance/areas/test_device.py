"""Device fds: GET_DEVICE_FD rules, device info, IRQ info, reset and hot-reset info."""

import errno

import pytest

from vfio_impl import uapi

from ..raw import errno_of

pytestmark = pytest.mark.vfio(device="edu")


def test_device_info(vfio, raw):
    _, _, d = raw.open_device()
    buf = uapi.vfio_device_info.pack()
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_GET_INFO, buf)
    info = uapi.vfio_device_info.unpack(buf)
    assert info.flags & uapi.VFIO_DEVICE_FLAGS_PCI
    assert info.num_regions >= uapi.VFIO_PCI_NUM_REGIONS
    assert info.num_irqs == uapi.VFIO_PCI_NUM_IRQS


def test_device_info_argsz_too_small(vfio, raw):
    _, _, d = raw.open_device()
    buf = uapi.vfio_device_info.pack(argsz=15)
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_GET_INFO, buf) == errno.EINVAL


def test_unknown_device_name(vfio, raw):
    _, g = raw.setup()
    assert errno_of(raw.device, g, "0000:7f:1f.7") == errno.ENODEV


def test_name_is_looked_up_before_the_container(vfio, raw):
    g = raw.group()
    assert errno_of(raw.device, g, "0000:7f:1f.7") == errno.ENODEV


def test_device_fd_needs_an_iommu(vfio, raw):
    c, g = raw.container(), raw.group()
    raw.set_container(g, c)
    assert errno_of(raw.device, g) == errno.EINVAL


def test_device_name_with_an_unknown_option(vfio, raw, vfio_device):
    _, g = raw.setup()
    assert errno_of(raw.device, g, vfio_device.bdf + " bogus=1") == errno.EINVAL


def test_device_name_prefix_does_not_match(vfio, raw, vfio_device):
    _, g = raw.setup()
    assert errno_of(raw.device, g, vfio_device.bdf[:-2]) == errno.ENODEV


def test_device_opens_more_than_once(vfio, raw):
    _, g, d1 = raw.open_device()
    d2 = raw.device(g)
    assert d1 != d2
    assert raw.bar_read(d2, 0, 0) == 0x010000ED


@pytest.mark.parametrize("index,flags,count", [
    (uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED, 1),
    (uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE, 1),
    (uapi.VFIO_PCI_MSIX_IRQ_INDEX, uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE, 0),
    (uapi.VFIO_PCI_REQ_IRQ_INDEX, uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE, 1),
], ids=["intx", "msi", "msix", "req"])
def test_edu_irq_info(vfio, raw, index, flags, count):
    _, _, d = raw.open_device()
    info = raw.irq_info(d, index)
    assert (info.flags, info.count) == (flags, count)


def test_err_irq_needs_pcie(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(raw.irq_info, d, uapi.VFIO_PCI_ERR_IRQ_INDEX) == errno.EINVAL


def test_irq_index_out_of_range(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(raw.irq_info, d, uapi.VFIO_PCI_NUM_IRQS) == errno.EINVAL


def test_irq_info_argsz_too_small(vfio, raw):
    _, _, d = raw.open_device()
    buf = uapi.vfio_irq_info.pack(argsz=15)
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf) == errno.EINVAL


@pytest.mark.vfio(device="edu", destructive=True)
def test_reset_follows_the_reset_flag(vfio, raw):
    _, _, d = raw.open_device()
    buf = uapi.vfio_device_info.pack()
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_GET_INFO, buf)
    works = bool(uapi.vfio_device_info.unpack(buf).flags & uapi.VFIO_DEVICE_FLAGS_RESET)
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_RESET, 0) == (0 if works else errno.EINVAL)


def test_hot_reset_info_on_the_root_bus(vfio, raw, vfio_device):
    if vfio_device.bdf[5:7] != "00":
        pytest.skip(f"{vfio.kind} backend: edu is not on the root bus")
    _, _, d = raw.open_device()
    buf = uapi.vfio_pci_hot_reset_info.pack()
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf) == errno.ENODEV


def test_unknown_device_ioctl(vfio, raw):
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_IOMMU_MAP_DMA + 40, 0) == errno.ENOTTY
