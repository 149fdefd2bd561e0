"""A userspace VFIO driver library: what QEMU's hw/vfio does, in Python, over a Host."""

from .container import AddressSpace, Container, DMABuffer, Group
from .device import Device, IRQInfo
from .errors import VFIOError
from .host import Host, RealHost
from .machine import Machine, RealClock, VirtualClock
from .region import Region, RegionInfo

__all__ = ["AddressSpace", "Container", "DMABuffer", "Device", "Group", "Host", "IRQInfo", "Machine", "RealClock",
           "RealHost", "Region", "RegionInfo", "VFIOError", "VirtualClock"]
