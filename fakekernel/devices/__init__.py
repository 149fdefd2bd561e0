"""Emulated devices of the fake kernel's catalog, each mirroring a device the real runner has."""

from .ccw_block import CcwBlock
from .ccw_virtio import VirtioBlkCcw
from .e1000e import E1000e
from .edu import Edu
from .ivshmem import Ivshmem, IvshmemDoorbell
from .pl031 import PL031
from .pl061 import PL061
from .platform_test import PlatformTest
from .virtio_mmio import VirtioMMIO

CATALOG = {"edu": Edu, "ivshmem": Ivshmem, "ivshmem-doorbell": IvshmemDoorbell, "e1000e": E1000e,
           "platform-test": PlatformTest, "pl031": PL031, "pl061": PL061,
           "virtio-mmio": VirtioMMIO,
           "ccw-block": CcwBlock, "virtio-blk-ccw": VirtioBlkCcw}
