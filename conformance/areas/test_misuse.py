"""Every ioctl misuse we found in the 6.1 sources, with the errno Linux answers.

Linux is not uniform: a bad action is ENOTTY where a bad index is EINVAL, a config read past
the end is EFAULT where a BAR read is EINVAL, and a fresh container answers EINVAL, not ENOTTY.
"""

import ctypes
import errno
import mmap
import struct

import pytest

from vfio_impl import uapi
from vfio_impl.core import irq

from ..raw import errno_of

pytestmark = pytest.mark.vfio(device="edu")
INTX, MSI, MSIX, ERR, REQ = range(5)
NONE, BOOL, EVENTFD = uapi.VFIO_IRQ_SET_DATA_NONE, uapi.VFIO_IRQ_SET_DATA_BOOL, uapi.VFIO_IRQ_SET_DATA_EVENTFD
MASK, UNMASK, TRIGGER = uapi.VFIO_IRQ_SET_ACTION_MASK, uapi.VFIO_IRQ_SET_ACTION_UNMASK, uapi.VFIO_IRQ_SET_ACTION_TRIGGER


def _short_argsz(efd):
    buf = irq.data_none(INTX, 0, 1, TRIGGER)
    uapi.vfio_irq_set.pack_into(buf, 0, argsz=19, flags=NONE | TRIGGER, index=INTX, start=0, count=1)
    return buf


def _eventfd_data_short(efd):
    buf = irq.eventfds(INTX, 0, [efd])
    struct.pack_into("=I", buf, 0, uapi.vfio_irq_set.size + 3)
    return buf


SET_IRQS = [
    ("argsz-below-header", _short_argsz, errno.EINVAL),
    ("index-out-of-range", lambda efd: irq.data_none(5, 0, 1, TRIGGER), errno.EINVAL),
    ("unknown-flag-bit", lambda efd: irq.irq_set(INTX, 0, 1, NONE | TRIGGER | 0x40), errno.EINVAL),
    ("two-data-types", lambda efd: irq.irq_set(INTX, 0, 1, NONE | BOOL | TRIGGER, b"\1"), errno.EINVAL),
    ("two-actions", lambda efd: irq.data_none(INTX, 0, 1, MASK | UNMASK), errno.ENOTTY),
    ("no-action", lambda efd: irq.data_none(INTX, 0, 1, 0), errno.ENOTTY),
    ("start-beyond-count", lambda efd: irq.data_none(INTX, 1, 1, TRIGGER), errno.EINVAL),
    ("count-beyond-vectors", lambda efd: irq.data_none(MSI, 0, 2, TRIGGER), errno.EINVAL),
    ("start-plus-count-wraps", lambda efd: irq.data_none(INTX, 1, 0xFFFFFFFF, TRIGGER), errno.EINVAL),
    ("eventfd-data-missing", _eventfd_data_short, errno.EINVAL),
    ("msix-without-capability", lambda efd: irq.eventfds(MSIX, 0, [efd]), errno.EINVAL),
    ("err-on-conventional-pci", lambda efd: irq.eventfds(ERR, 0, [efd]), errno.EINVAL),
    ("intx-mask-before-enable", lambda efd: irq.data_none(INTX, 0, 1, MASK), errno.EINVAL),
    ("intx-unmask-before-enable", lambda efd: irq.data_none(INTX, 0, 1, UNMASK), errno.EINVAL),
    ("intx-loopback-before-enable", lambda efd: irq.data_none(INTX, 0, 1, TRIGGER), errno.EINVAL),
    ("msi-loopback-before-enable", lambda efd: irq.data_none(MSI, 0, 1, TRIGGER), errno.EINVAL),
    ("msi-mask", lambda efd: irq.data_none(MSI, 0, 1, MASK), errno.ENOTTY),
    ("req-unmask", lambda efd: irq.data_none(REQ, 0, 1, UNMASK), errno.ENOTTY),
    ("req-none-without-eventfd", lambda efd: irq.data_none(REQ, 0, 1, TRIGGER), errno.EINVAL),
    ("req-bool-count-zero", lambda efd: irq.irq_set(REQ, 0, 0, BOOL | TRIGGER), errno.EINVAL),
    ("bad-fd", lambda efd: irq.eventfds(INTX, 0, [12345]), errno.EBADF),
    ("fd-not-an-eventfd", lambda efd: irq.eventfds(INTX, 0, [0]), errno.EINVAL),
    ("msi-bad-fd", lambda efd: irq.eventfds(MSI, 0, [12345]), errno.EBADF),
]


@pytest.mark.parametrize("build,expect", [c[1:] for c in SET_IRQS], ids=[c[0] for c in SET_IRQS])
def test_set_irqs_misuse(vfio, raw, build, expect):
    _, _, d = raw.open_device()
    efd = raw.eventfd()
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_SET_IRQS, build(efd)) == expect


def test_intx_mask_with_eventfd_is_not_implemented(vfio, raw):
    _, _, d = raw.open_device()
    efd = raw.eventfd()
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(INTX, 0, [efd]))
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(INTX, 0, [efd], MASK)) == errno.ENOTTY
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq.data_none(INTX, 0, 0, TRIGGER))


def test_failed_msi_enable_leaves_no_mode_behind(vfio, raw):
    """A bad fd while enabling MSI disables it again, so INTx can be enabled afterwards."""
    _, _, d = raw.open_device()
    assert errno_of(vfio.host.ioctl, d, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(MSI, 0, [12345])) == errno.EBADF
    efd = raw.eventfd()
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(INTX, 0, [efd]))
    vfio.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq.data_none(INTX, 0, 0, TRIGGER))


DMA_MAP = [
    ("argsz-below-minimum", dict(argsz=31, flags=3, size=4096), errno.EINVAL),
    ("unknown-flag", dict(flags=3 | 8, size=4096), errno.EINVAL),
    ("no-permission", dict(flags=0, size=4096), errno.EINVAL),
    ("vaddr-with-permission", dict(flags=uapi.VFIO_DMA_MAP_FLAG_VADDR | 1, size=4096), errno.EINVAL),
    ("size-zero", dict(flags=3, size=0), errno.EINVAL),
    ("size-unaligned", dict(flags=3, size=100), errno.EINVAL),
    ("iova-unaligned", dict(flags=3, size=4096, iova=0x100010), errno.EINVAL),
    ("iova-wraps", dict(flags=3, size=0x2000, iova=(1 << 64) - 0x1000), errno.EINVAL),
    ("iova-in-the-msi-window", dict(flags=3, size=4096, iova=0xFEE00000), errno.EINVAL),
    ("vaddr-not-mapped", dict(flags=3, size=4096, iova=0x100000, vaddr=0x1000), errno.EFAULT),
]


@pytest.mark.parametrize("fields,expect", [c[1:] for c in DMA_MAP], ids=[c[0] for c in DMA_MAP])
def test_map_dma_misuse(vfio, raw, fields, expect):
    c, _ = raw.setup()
    buf = uapi.vfio_iommu_type1_dma_map.pack(**fields)
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_IOMMU_MAP_DMA, buf) == expect


DMA_UNMAP = [
    ("argsz-below-minimum", dict(argsz=23, iova=0x100000, size=4096), errno.EINVAL),
    ("unknown-flag", dict(flags=8, iova=0x100000, size=4096), errno.EINVAL),
    ("size-zero", dict(iova=0x100000, size=0), errno.EINVAL),
    ("iova-unaligned", dict(iova=0x100010, size=4096), errno.EINVAL),
    ("all-with-a-range", dict(flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL, iova=0x100000, size=4096), errno.EINVAL),
    ("dirty-bitmap-with-all", dict(flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP), errno.EINVAL),
]


@pytest.mark.parametrize("fields,expect", [c[1:] for c in DMA_UNMAP], ids=[c[0] for c in DMA_UNMAP])
def test_unmap_dma_misuse(vfio, raw, fields, expect):
    c, _ = raw.setup()
    buf = uapi.vfio_iommu_type1_dma_unmap.pack(**fields)
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_IOMMU_UNMAP_DMA, buf) == expect


def test_iommu_info_argsz_below_minimum(vfio, raw):
    c, _ = raw.setup()
    buf = uapi.vfio_iommu_type1_info.pack(argsz=15)
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_IOMMU_GET_INFO, buf) == errno.EINVAL


def test_group_status_argsz_below_minimum(vfio, raw):
    buf = uapi.vfio_group_status.pack(argsz=7)
    assert errno_of(vfio.host.ioctl, raw.group(), uapi.VFIO_GROUP_GET_STATUS, buf) == errno.EINVAL


def test_set_container_with_a_closed_fd(vfio, raw):
    assert errno_of(raw.set_container, raw.group(), 12345) == errno.EBADF


def test_device_name_longer_than_a_page(vfio, raw):
    _, g = raw.setup()
    assert errno_of(vfio.host.ioctl, g, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0" * 5000 + b"\0") == errno.EINVAL


def test_read_on_a_container(vfio, raw):
    assert errno_of(vfio.host.pread, raw.container(), 4, 0) == errno.EINVAL



def test_map_dma_write_of_read_only_memory(vfio, raw):
    """Pinning for device writes needs writable pages: EFAULT, while a READ-only map is fine."""
    c, _ = raw.setup()
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    page = mmap.PAGESIZE
    vaddr = libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        rw = uapi.vfio_iommu_type1_dma_map.pack(flags=3, vaddr=vaddr, iova=0x100000, size=page)
        assert errno_of(vfio.host.ioctl, c, uapi.VFIO_IOMMU_MAP_DMA, rw) == errno.EFAULT
        ro = uapi.vfio_iommu_type1_dma_map.pack(flags=1, vaddr=vaddr, iova=0x100000, size=page)
        vfio.host.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, ro)
        vfio.host.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, uapi.vfio_iommu_type1_dma_unmap.pack(iova=0x100000, size=page))
    finally:
        libc.munmap(vaddr, page)
