"""The VFIO userspace ABI: ioctl numbers, constants, struct layouts, capability chains.

The one place <linux/vfio.h> and <linux/vfio_ccw.h> are spelled out, so the
driver and the fake kernel cannot drift apart on the ABI; the test suite
holds this module to the real header with gcc.
"""

from vfio_impl.uapi import _constants, _ioctls, _structs
from vfio_impl.uapi._cdef import ffi
from vfio_impl.uapi._constants import *  # noqa: F403
from vfio_impl.uapi._ioctls import *  # noqa: F403
from vfio_impl.uapi._structs import *  # noqa: F403
from vfio_impl.uapi.caps import *  # noqa: F403
from vfio_impl.uapi.caps import __all__ as _caps_all
from vfio_impl.uapi.layout import Layout


def _public(module, kind: type) -> dict:
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and isinstance(value, kind)}


CONSTANTS: dict[str, int] = _public(_constants, int)
IOCTLS: dict[str, int] = _public(_ioctls, int)
STRUCTS: dict[str, Layout] = _public(_structs, Layout)

__all__ = ["CONSTANTS", "IOCTLS", "STRUCTS", "Layout", "ffi",
           *CONSTANTS, *IOCTLS, *STRUCTS, *_caps_all]
