"""An empty virtio-mmio transport of QEMU's virt board (hw/virtio/virtio-mmio.c with no backend).

The board makes 32 of them, 0x200 bytes each, most with nothing plugged in. With no backend QEMU
answers only the magic value, the version and the vendor ID, every other register reads 0
(device ID 0: no driver claims it) and every write is dropped; the interrupt line, wired
edge-triggered in the board's devicetree, never rises.
"""

from __future__ import annotations

from .platform_test import Resource
from .sysbus import SysBusDevice

MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
VIRT_MAGIC = 0x74726976  # "virt"
VIRT_VERSION_LEGACY = 1  # the virt board keeps force-legacy on
VIRT_VENDOR = 0x554D4551  # "QEMU"
TRANSPORT_SIZE = 0x200
ANSWERED = {MAGIC_VALUE: VIRT_MAGIC, VERSION: VIRT_VERSION_LEGACY, VENDOR_ID: VIRT_VENDOR}


class VirtioMMIO(SysBusDevice):
    resources = (Resource(TRANSPORT_SIZE),)
    irq_levels = (False,)

    def read(self, offset: int) -> int:
        return ANSWERED.get(offset, 0)
