"""What every vfio bus driver shares for interrupts: SET_IRQS validation and trigger contexts
(virqfds are virqfd.py's).

vfio_set_irqs_validate_and_prepare is one function in vfio_main.c that vfio-pci and
vfio-platform call with different limits; so it is one function here.
"""

from __future__ import annotations

import errno
import struct

from vfio_impl import uapi

from .err import error
from .eventfd import EventfdCtx

SET_IRQS_MINSZ = uapi.vfio_irq_set.offsetof("count") + 4
DATA_MASK = uapi.VFIO_IRQ_SET_DATA_TYPE_MASK
ACTION_MASK = uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK
DATA_SIZES = {uapi.VFIO_IRQ_SET_DATA_NONE: 0, uapi.VFIO_IRQ_SET_DATA_BOOL: 1, uapi.VFIO_IRQ_SET_DATA_EVENTFD: 4}


def validate_and_prepare(hdr, buf: bytearray, num_irqs: int, max_irq_type: int) -> tuple[int, list[int] | None]:
    """The header checks, then the data copied in: (data type, data) with data None for DATA_NONE.

    `num_irqs` bounds start and count, `max_irq_type` the index; vfio-pci passes the index's
    vector count, vfio-platform its number of IRQs for both."""
    if (hdr.argsz < SET_IRQS_MINSZ or hdr.index >= max_irq_type or hdr.count >= 0xFFFFFFFF - hdr.start
            or hdr.flags & ~(DATA_MASK | ACTION_MASK)):
        raise error(errno.EINVAL, "bad vfio_irq_set header")
    if hdr.start >= num_irqs or hdr.start + hdr.count > num_irqs:
        raise error(errno.EINVAL, "start/count beyond the index's vectors")
    data_type = hdr.flags & DATA_MASK
    size = DATA_SIZES.get(data_type)
    if size is None:
        raise error(errno.EINVAL, "more than one data type")
    if size and hdr.argsz - SET_IRQS_MINSZ < hdr.count * size:
        raise error(errno.EINVAL, "argsz too small for the data")
    base = uapi.vfio_irq_set.size
    raw = bytes(buf[base:base + hdr.count * size])
    if len(raw) < hdr.count * size:
        raise error(errno.EFAULT, "data beyond the buffer")
    # The eventfds are ints in the caller's byte order, as the kernel's copy_from_user reads them.
    data = (list(struct.unpack(f"={hdr.count}i", raw)) if size == 4 else list(raw)) if size else None
    return data_type, data


def wants(data_type: int, data: list[int] | None) -> bool:
    """DATA_NONE always acts; DATA_BOOL acts when its first byte is set."""
    return data_type == uapi.VFIO_IRQ_SET_DATA_NONE or bool(data and data[0])


class IRQContext:
    """One vector's trigger eventfd, as vdev->ctx[i] holds it."""

    __slots__ = ("trigger",)

    def __init__(self) -> None:
        self.trigger: EventfdCtx | None = None

    def set_trigger(self, fd: int) -> None:
        new = EventfdCtx(fd) if fd >= 0 else None
        if self.trigger:
            self.trigger.put()
        self.trigger = new

    def signal(self) -> None:
        if self.trigger:
            self.trigger.signal()
