"""The fake kernel as the benchmarks open it: the CI VM's edu and ivshmem-plain at their
addresses there, attached through vfio_impl."""

from __future__ import annotations

import contextlib
import os

from fakekernel import FakeKernel, Topology
from fakekernel.topology import PciDeviceSpec
from vfio_impl import AddressSpace, Device, uapi
from vfio_impl.vmm.machine import Machine

EDU = "0000:00:03.0"
IVSHMEM = "0000:00:04.0"
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY_MASTER = 0x6
CONFIG_INDEX = uapi.VFIO_PCI_CONFIG_REGION_INDEX


def topology() -> Topology:
    return Topology([PciDeviceSpec(EDU, "edu", 1), PciDeviceSpec(IVSHMEM, "ivshmem", 2)], "bench")


@contextlib.contextmanager
def attached(bdf: str, machine: Machine | None = None):
    """(kernel, device) for one function, closed in reverse on the way out;
    the machine's RAM is mapped for DMA by the container's memory listener."""
    with FakeKernel(topology()) as kernel, AddressSpace(kernel, machine) as space:
        with Device.attach(space, f"/sys/bus/pci/devices/{bdf}") as device:
            yield kernel, device


def bus_master(device: Device) -> None:
    """Memory decode and bus master, as a driver sets them before MSI or DMA."""
    device.region(CONFIG_INDEX).pwrite(PCI_COMMAND, PCI_COMMAND_MEMORY_MASTER.to_bytes(2, "little"))


def memfd(size: int) -> int:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd
