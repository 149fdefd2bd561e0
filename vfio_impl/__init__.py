"""A userspace VFIO driver library: what QEMU's hw/vfio does, in Python, over a Host."""

from vfio_impl.core.container import AddressSpace, Container, DMABuffer, Group
from vfio_impl.core.device import Device, IRQInfo
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.host import Host, RealHost
from vfio_impl.core.region import Region, RegionInfo
from vfio_impl.vmm.machine import Machine, RealClock, VirtualClock

__all__ = ["AddressSpace", "Container", "DMABuffer", "Device", "Group", "Host", "IRQInfo", "Machine", "RealClock",
           "RealHost", "Region", "RegionInfo", "VFIOError", "VirtualClock"]
