"""IRQ signalling: the one builder of vfio_irq_set with its trailing data, and the named helpers."""

from __future__ import annotations

import struct

from vfio_impl import uapi

_HDR = uapi.vfio_irq_set


def irq_set(index: int, start: int, count: int, flags: int, data: bytes = b"") -> bytearray:
    """A vfio_irq_set header followed by its data, argsz covering both."""
    buf = bytearray(_HDR.size + len(data))
    _HDR.pack_into(buf, 0, argsz=len(buf), flags=flags, index=index, start=start, count=count)
    buf[_HDR.size:] = data
    return buf


def eventfds(index: int, start: int, fds: list[int], action: int = uapi.VFIO_IRQ_SET_ACTION_TRIGGER) -> bytearray:
    """fd -1 de-assigns a vector."""
    return irq_set(index, start, len(fds), uapi.VFIO_IRQ_SET_DATA_EVENTFD | action,
                   struct.pack(f"={len(fds)}i", *fds))


def data_none(index: int, start: int, count: int, action: int) -> bytearray:
    return irq_set(index, start, count, uapi.VFIO_IRQ_SET_DATA_NONE | action)


def data_bool(index: int, start: int, values: list[bool], action: int) -> bytearray:
    return irq_set(index, start, len(values), uapi.VFIO_IRQ_SET_DATA_BOOL | action,
                   bytes(1 if v else 0 for v in values))
