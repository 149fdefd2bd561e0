"""A small block store behind an I/O subchannel: the fake's own device for vfio-ccw's data paths,
which the CI guest's virtio-ccw device cannot show (it has no plain READ and WRITE).

READ and WRITE move `count` bytes at a position that starts at 0 with every channel program and
advances with each transfer, so a block written by one program is read back by the next. A
transfer past the end is a unit check with equipment-check sense; every other command of its own
is a command reject, as css.c makes of an unknown one. SENSE ID names a control unit type no
real device has.
"""

from __future__ import annotations

import errno

from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, SenseID

from .ccw_subchannel import DataStream, Subchannel

CAPACITY = 64 * 1024
SENSE_EQUIPMENT_CHECK = 0x10
CU_TYPE = 0xFAC3


class CcwBlock:
    """The device: a byte store and its position within the running channel program."""

    model = "ccw-block"
    sense_id = SenseID(cu_type=CU_TYPE, cu_model=0x01, dev_type=CU_TYPE, dev_model=0x01)

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.store = bytearray(capacity)
        self.pos = 0
        self._program = 0

    def ccw_cb(self, sch: Subchannel, ccw: CCW1, stream: DataStream) -> int:
        if self._program != sch.programs:
            self._program, self.pos = sch.programs, 0
        if ccw.cmd_code not in (css.CCW_CMD_READ, css.CCW_CMD_WRITE):
            return -errno.ENOSYS
        if self.pos + ccw.count > len(self.store):
            return sch.unit_check(SENSE_EQUIPMENT_CHECK)
        if ccw.cmd_code == css.CCW_CMD_WRITE:
            data = stream.read(ccw.count)
            if data is None:
                return -errno.EINVAL
            self.store[self.pos:self.pos + ccw.count] = data
        elif stream.write(bytes(self.store[self.pos:self.pos + ccw.count])):
            return -errno.EINVAL
        self.pos += ccw.count
        sch.scsw.count = 0
        return 0

    def disabled(self) -> None:
        """Nothing of the store depends on the subchannel being enabled."""
