"""A DMA the fake refuses is visible: FakeKernel.iommu_faults() lists the IOMMU's faults of every
container, each one is a WARNING on `fakekernel.iommu`, and a DMA dropped because bus master is
off is a WARNING on `fakekernel.pci`."""

import logging

import pytest

from fakekernel import FakeKernel, Topology
from fakekernel.iommu import IOMMUFault
from vfio_impl import AddressSpace, Device, uapi

EDU = "/sys/bus/pci/devices/0000:00:03.0"
EDU2 = "/sys/bus/pci/devices/0000:00:04.0"
MEMORY, MASTER = 0x2, 0x4


@pytest.fixture
def kernel():
    with FakeKernel(Topology.named("two-groups")) as k:
        yield k


def attach(space, sysfs, command=MEMORY | MASTER):
    dev = Device.attach(space, sysfs)
    cfg = dev.region(uapi.VFIO_PCI_CONFIG_REGION_INDEX)
    cfg.write(4, command, 2)
    return dev


def dma(dev, src: int, dst: int, count: int, to_ram: bool) -> None:
    """edu's engine; the fake finishes the transfer before the command write returns."""
    bar = dev.region(0)
    for reg, value in ((0x80, src), (0x88, dst), (0x90, count), (0x98, 0x1 | (0x2 if to_ram else 0))):
        bar.write(reg, value, 4)


def warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def test_dma_to_an_unmapped_iova_is_listed_and_logged(kernel, caplog):
    with AddressSpace(kernel) as space:
        edu = attach(space, EDU)
        dma(edu, 0x40000, 0x300000, 64, to_ram=True)
        dma(edu, 0x310000, 0x40000, 8, to_ram=False)
    assert kernel.iommu_faults() == [IOMMUFault(0x300000, 64, True, "unmapped"),
                                     IOMMUFault(0x310000, 8, False, "unmapped")]
    assert warnings(caplog, "fakekernel.iommu") == [
        "IOMMU fault: DMA write of 64 bytes at IOVA 0x300000 refused: unmapped",
        "IOMMU fault: DMA read of 8 bytes at IOVA 0x310000 refused: unmapped"]


def test_a_write_into_a_read_only_buffer_is_a_fault(kernel, caplog):
    with AddressSpace(kernel) as space:
        edu = attach(space, EDU)
        with space.dma_buffer(4096, iova=0x100000, readonly=True) as buf:
            buf.view[:4] = b"keep"
            dma(edu, 0x40000, 0x100000, 4, to_ram=True)
            assert buf.view[:4] == b"keep"
    assert [f.reason for f in kernel.iommu_faults()] == ["write to a read-only mapping"]
    assert "refused: write to a read-only mapping" in warnings(caplog, "fakekernel.iommu")[0]


def test_faults_of_every_container_outlive_it(kernel):
    """Two address spaces, two containers: both faults are listed after both are gone, and the
    list handed out is a copy."""
    with AddressSpace(kernel) as one, AddressSpace(kernel) as two:
        dma(attach(one, EDU), 0x40000, 0x300000, 4, to_ram=True)
        dma(attach(two, EDU2), 0x40000, 0x400000, 4, to_ram=True)
    faults = kernel.iommu_faults()
    assert [f.iova for f in faults] == [0x300000, 0x400000]
    faults.clear()
    assert len(kernel.iommu_faults()) == 2


def test_dma_with_bus_master_off_is_dropped_with_a_warning(kernel, caplog):
    """The request never reaches the IOMMU, so it is no IOMMU fault; the log says why nothing came."""
    with AddressSpace(kernel) as space:
        edu = attach(space, EDU, command=MEMORY)
        with space.dma_buffer(4096, iova=0x100000) as buf:
            dma(edu, 0x40000, 0x100000, 16, to_ram=True)
            dma(edu, 0x100000, 0x40000, 8, to_ram=False)
            assert buf.view[:16] == bytes(16)
    assert kernel.iommu_faults() == []
    assert warnings(caplog, "fakekernel.pci") == [
        "edu: DMA write of 16 bytes at 0x100000 dropped: bus master is off in COMMAND",
        "edu: DMA read of 8 bytes at 0x100000 dropped: bus master is off in COMMAND"]
