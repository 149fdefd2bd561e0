"""The devices the ccw area knows behind a vfio-ccw mdev, as the s390x CI guest and the fake's ccw
topology have them, and what a test can ask of one.

A vfio-ccw mdev does not say in sysfs what is behind its subchannel: Linux keeps SENSE ID's answer
(cutype, devtype) on the subchannel's ccw device, which io_subchannel unregisters when the
subchannel is handed to vfio_ccw. So the suite asks the device, as cio's own recognition does: a
SENSE ID, whose control unit type and model name the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vfio_impl.uapi import css
from vfio_impl.uapi.css import SenseID


@dataclass(frozen=True)
class CcwModel:
    name: str
    sense_id: SenseID
    commands: frozenset[int]        # the device's own commands beyond css.c's
    capacity: int | None = None     # sectors, as READ_CONF's first field gives them

    @property
    def virtio(self) -> bool:
        return self.sense_id.cu_type == css.VIRTIO_CCW_CU_TYPE


CCW_MODELS = {m.name: m for m in (
    # QEMU's virtio-blk-ccw over the CI guest's 8 MiB disk.
    CcwModel("virtio-blk-ccw", SenseID(cu_type=css.VIRTIO_CCW_CU_TYPE, cu_model=css.VIRTIO_ID_BLOCK),
             frozenset({css.CCW_CMD_READ_FEAT, css.CCW_CMD_READ_CONF}), capacity=16384),
    # The fake's block store (fakekernel/devices/ccw_block.py).
    CcwModel("ccw-block", SenseID(cu_type=0xFAC3, cu_model=0x01, dev_type=0xFAC3, dev_model=0x01),
             frozenset({css.CCW_CMD_READ, css.CCW_CMD_WRITE})),
)}


def model_of(sense_id: SenseID) -> CcwModel | None:
    """The model whose control unit and device SENSE ID names; None for one the suite does not know."""
    key = (sense_id.cu_type, sense_id.cu_model, sense_id.dev_type, sense_id.dev_model)
    return next((m for m in CCW_MODELS.values()
                 if key == (m.sense_id.cu_type, m.sense_id.cu_model, m.sense_id.dev_type, m.sense_id.dev_model)),
                None)


# What a ccw test can ask of its device, and the models that have it, best first: the CI guest's
# virtio-blk-ccw before the fake's block store, so on the fake a test runs on the device the
# guest offers, and the store stands in only for what virtio-ccw cannot do (move blocks). None
# is a device whose model is unknown: on a real backend that may not DMA, nothing asked it.
ROLES: dict[str, tuple[str, Callable[[CcwModel | None], bool]]] = {
    "any": ("vfio-ccw mdev", lambda m: True),
    "identified": ("vfio-ccw mdev whose device answered SENSE ID", lambda m: m is not None),
    "virtio": ("vfio-ccw mdev of a virtio-ccw device (control unit 3832)", lambda m: m is not None and m.virtio),
    "virtio-blk": ("vfio-ccw mdev of a virtio-blk-ccw device whose capacity the suite knows",
                   lambda m: m is not None and m.capacity is not None),
    "store": ("vfio-ccw mdev of a device with READ and WRITE (the fake's ccw-block)",
              lambda m: m is not None and {css.CCW_CMD_READ, css.CCW_CMD_WRITE} <= m.commands),
}
PREFERENCE = ("virtio-blk-ccw", "ccw-block", None)
