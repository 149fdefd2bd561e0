"""VFIO ioctl request numbers, each derived as the header does it.

VFIO encodes no size or direction in its requests (argsz does that job), so
every one is ``_IO(VFIO_TYPE, VFIO_BASE + n)``.  Several numbers are shared:
a request only means something for the fd type and IOMMU model it is sent to.
Every public name here ends up in ``uapi.IOCTLS``.
"""

import platform as _platform

from vfio_impl.uapi import _constants as _c

# asm-generic/ioctl.h: an 8-bit number, 8-bit type, then size and direction.
# A few architectures give the direction 3 bits and "none" the value 1.
if _platform.machine().startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
    _IOC_NONE, _IOC_SIZEBITS = 1, 13
else:
    _IOC_NONE, _IOC_SIZEBITS = 0, 14
_IOC_TYPESHIFT = 8
_IOC_DIRSHIFT = 8 + 8 + _IOC_SIZEBITS


def _IO(type_: int, nr: int) -> int:
    return (_IOC_NONE << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | nr


def _vfio(n: int) -> int:
    return _IO(_c.VFIO_TYPE, _c.VFIO_BASE + n)


# Container (/dev/vfio/vfio)
VFIO_GET_API_VERSION = _vfio(0)
VFIO_CHECK_EXTENSION = _vfio(1)
VFIO_SET_IOMMU = _vfio(2)

# Group (/dev/vfio/$GROUP)
VFIO_GROUP_GET_STATUS = _vfio(3)
VFIO_GROUP_SET_CONTAINER = _vfio(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio(6)

# Device
VFIO_DEVICE_GET_INFO = _vfio(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio(9)
VFIO_DEVICE_SET_IRQS = _vfio(10)
VFIO_DEVICE_RESET = _vfio(11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _vfio(12)
VFIO_DEVICE_PCI_HOT_RESET = _vfio(13)
VFIO_DEVICE_QUERY_GFX_PLANE = _vfio(14)
VFIO_DEVICE_GET_GFX_DMABUF = _vfio(15)
VFIO_DEVICE_IOEVENTFD = _vfio(16)
VFIO_DEVICE_FEATURE = _vfio(17)

# Type1 IOMMU (container fd)
VFIO_IOMMU_GET_INFO = _vfio(12)
VFIO_IOMMU_MAP_DMA = _vfio(13)
VFIO_IOMMU_UNMAP_DMA = _vfio(14)
VFIO_IOMMU_DIRTY_PAGES = _vfio(17)

# SPAPR TCE IOMMU (container fd)
VFIO_IOMMU_ENABLE = _vfio(15)
VFIO_IOMMU_DISABLE = _vfio(16)
VFIO_IOMMU_SPAPR_TCE_GET_INFO = _vfio(12)
VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _vfio(17)
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _vfio(18)
VFIO_IOMMU_SPAPR_TCE_CREATE = _vfio(19)
VFIO_IOMMU_SPAPR_TCE_REMOVE = _vfio(20)
VFIO_EEH_PE_OP = _vfio(21)
