"""A fake Linux VFIO kernel: /dev/vfio, sysfs, vfio-pci, a translating type1 IOMMU, emulated devices."""

from .kernel import FakeKernel
from .profile import Profile
from .topology import PciDeviceSpec, PlatformDeviceSpec, Topology

__all__ = ["FakeKernel", "PciDeviceSpec", "PlatformDeviceSpec", "Profile", "Topology"]
