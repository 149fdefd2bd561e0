"""Figure 2: the fake kernel's VFIO_DEVICE_GET_REGION_INFO against a real ioctl syscall.

The real side is FIONREAD on a pipe with a buffer the size of vfio_region_info, so
fcntl.ioctl copies the same bytes in and out as the fake's caller does.
"""

from __future__ import annotations

import fcntl
import os
import termios

from vfio_impl import uapi

from .fake import EDU, attached
from .harness import Figure, Target, compare, loop
from .scale import Scale


def figure_2(scale: Scale) -> Figure:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with attached(EDU) as (kernel, device):
            info = uapi.vfio_region_info.pack(index=0)
            real = bytearray(len(info))
            samples = compare(loop("ioctl(fd, request, buf)", ioctl=kernel.ioctl, fd=device.fd,
                                   request=uapi.VFIO_DEVICE_GET_REGION_INFO, buf=info),
                              loop("ioctl(fd, request, buf)", ioctl=fcntl.ioctl, fd=r, request=termios.FIONREAD, buf=real),
                              scale.ops, scale.repeats, rate=True)
    finally:
        os.close(r)
        os.close(w)
    return Figure("2", "fake GET_REGION_INFO rate", "FakeKernel.ioctl(VFIO_DEVICE_GET_REGION_INFO, BAR0) on edu",
                  "fcntl.ioctl(FIONREAD) on a pipe, same 32-byte buffer", samples, Target(">=", 1))
