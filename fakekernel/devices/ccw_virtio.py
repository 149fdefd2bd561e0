"""A virtio-blk device behind a virtio-ccw subchannel, as QEMU 7.2's virtio-blk-ccw answers the
channel commands: the device the s390x CI guest binds to vfio_ccw (an 8 MiB disk at fe.0.0001).

SENSE ID (css.c's) names control unit 3832 with the virtio device id, 2, as its model. The
device's own commands are virtio_ccw_cb's: READ_FEAT gives 32 feature bits of the index the
guest put after them, READ_CONF the device configuration, whose first field is the capacity in
512-byte sectors. The first command that is not SET_VIRTIO_REV makes the device a legacy one
(revision 0), whose configuration is in the guest's byte order (big-endian on s390x) and which
offers no feature bits past 31; disabling the subchannel forgets any revision
(virtio_sch_disable_cb), and the fake models only the legacy device. A virtio-ccw device has no
plain READ or WRITE: those, like every command QEMU does not know, are command rejects. So are,
here, SET_VIRTIO_REV and the commands that set the device up for virtqueues (SET_VQ,
WRITE_STATUS, SET_IND...), which QEMU implements and the suite never sends.
"""

from __future__ import annotations

import errno
import struct

from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, SenseID

from .ccw_subchannel import DataStream, Subchannel

SECTOR = 512
# The CI guest's disk: an 8 MiB raw image.
DISK_SIZE = 8 * 1024 * 1024
# virtio_blk_config up to write_zeroes_may_unmap: QEMU's config size with the discard and
# write-zeroes features it offers by default (virtio_blk_common_get_config_size).
CONFIG_SIZE = 57
# The low 32 bits of what QEMU 7.2's virtio-blk offers with its defaults (virtio_blk_get_features
# and the virtio core's properties): SEG_MAX, GEOMETRY, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE,
# DISCARD, WRITE_ZEROES, NOTIFY_ON_EMPTY, ANY_LAYOUT, RING_INDIRECT_DESC and RING_EVENT_IDX.
FEATURES_0_31 = sum(1 << bit for bit in (2, 4, 6, 9, 10, 11, 13, 14, 24, 27, 28, 29))
# virtio_ccw_cb's VirtioFeatDesc: 32 feature bits, little-endian, and the index of the 32 asked for.
FEAT_DESC_SIZE = 5


class VirtioBlkCcw:
    """The device, legacy as vfio-ccw leaves it: its capacity is all its configuration holds."""

    model = "virtio-blk-ccw"
    sense_id = SenseID(cu_type=css.VIRTIO_CCW_CU_TYPE, cu_model=css.VIRTIO_ID_BLOCK)

    def __init__(self, disk_size: int = DISK_SIZE) -> None:
        self.capacity = disk_size // SECTOR

    def config(self) -> bytes:
        """virtio_blk_update_config as far as the fake models it: the capacity; the rest reads 0."""
        return struct.pack(">Q", self.capacity).ljust(CONFIG_SIZE, b"\0")

    def ccw_cb(self, sch: Subchannel, ccw: CCW1, stream: DataStream) -> int:
        check_len = not (ccw.flags & css.CCW_FLAG_SLI and not ccw.flags & css.CCW_FLAG_DC)
        if ccw.cmd_code == css.CCW_CMD_READ_FEAT:
            return self._read_feat(sch, ccw, stream, check_len)
        if ccw.cmd_code == css.CCW_CMD_READ_CONF:
            return self._read_conf(sch, ccw, stream, check_len)
        return -errno.ENOSYS

    def _read_feat(self, sch: Subchannel, ccw: CCW1, stream: DataStream, check_len: bool) -> int:
        if ccw.count != FEAT_DESC_SIZE if check_len else ccw.count < FEAT_DESC_SIZE:
            return -errno.EINVAL
        if not ccw.cda:
            return -errno.EFAULT
        stream.advance(4)
        index = stream.read(1)
        if index is None:
            return -errno.EINVAL
        stream.rewind()
        ret = stream.write(struct.pack("<I", FEATURES_0_31 if index == b"\0" else 0))
        if not ret:
            sch.scsw.count = ccw.count - FEAT_DESC_SIZE
        return ret

    def _read_conf(self, sch: Subchannel, ccw: CCW1, stream: DataStream, check_len: bool) -> int:
        """The residual count is left as an earlier command set it when the copy succeeds: QEMU
        7.2 stores it only when the copy fails."""
        if check_len and ccw.count > CONFIG_SIZE:
            return -errno.EINVAL
        if not ccw.cda:
            return -errno.EFAULT
        n = min(ccw.count, CONFIG_SIZE)
        ret = stream.write(self.config()[:n])
        if ret:
            sch.scsw.count = ccw.count - n
        return ret

    def disabled(self) -> None:
        """The revision it forgets is the legacy one it takes again at the next command."""
