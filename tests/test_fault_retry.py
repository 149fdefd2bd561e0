"""The seeds' retry paths, each proven by injecting the answer it retries on: MAP_DMA's EBUSY
(unmap, then map once more), vfio-ccw's EAGAIN (write again), the ROM's EINTR and EAGAIN (read
again) and an MSI enable granted fewer vectors (enable again with that many)."""

import errno

import pytest

from conformance.reliability import CCW_MDEV, ROM_MSI, Rig, RomMsiFunction, enable_msi, pci_topology, realize_pci
from fakekernel import FakeKernel
from fakekernel.faults import Fault, census
from vfio_impl import VFIOError, uapi
from vfio_impl.core.device import Device
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.ccw import VFIOCCWDevice
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, ORB, SCHIB
from vfio_impl.vmm.css import ChannelSubsystem, IOInstEnding
from vfio_impl.vmm.machine import RAMArea

PAGE = 4096
MAP, UNMAP = "ioctl VFIO_IOMMU_MAP_DMA iova=0x100000 size=0x4000", "ioctl VFIO_IOMMU_UNMAP_DMA iova=0x100000 size=0x4000"


@pytest.fixture
def kernel():
    with FakeKernel(pci_topology()) as k:
        yield k


@pytest.fixture
def rig(kernel):
    rig = Rig(kernel)
    yield rig
    rig.teardown()


def dma_mappings(kernel) -> int:
    return census(kernel)["dma mappings"]


# -- MAP_DMA: EBUSY -> unmap and retry ------------------------------------------------------------
@pytest.fixture
def container(rig):
    device = Device.attach(rig.space, "/sys/bus/pci/devices/0000:00:03.0")
    rig.later(device.close)
    return device.group.container


def map_ram(rig, container):
    """MAP_DMA of four pages at 0x100000 called directly: the listener reports what it raises."""
    area = RAMArea(0x100000, 4 * PAGE)
    rig.later(area.memory.close)
    container.map_dma(area.gpa, area.size, area.vaddr)


def test_map_dma_ebusy_unmaps_the_range_and_maps_again(rig, kernel, container):
    with kernel.faults.record() as calls, TraceRecorder() as trace, \
            kernel.faults.inject("ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY") as (rule,):
        rig.machine.add_ram(0x100000, 4 * PAGE)
    assert [c.name for c in calls] == [MAP, UNMAP, MAP] and rule.hits == 1
    assert trace.named("vfio_dma_map_ebusy_retry") == [{"iova": 0x100000, "size": 4 * PAGE}]
    assert container.mappings == {0x100000: 4 * PAGE} and dma_mappings(kernel) == 1


def test_map_dma_retries_once_only(rig, kernel, container):
    with kernel.faults.record() as calls, kernel.faults.inject("ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY,times=all"):
        with pytest.raises(VFIOError) as e:
            map_ram(rig, container)
    assert [c.name for c in calls] == [MAP, UNMAP, MAP]
    assert e.value.message.startswith("vfio_dma_map(0x100000, 0x4000, ") and e.value.errno == errno.EBUSY
    assert container.mappings == {} and dma_mappings(kernel) == 0


def test_map_dma_ebusy_with_a_failing_unmap_gives_up_with_the_unmaps_errno(rig, kernel, container):
    with kernel.faults.record() as calls, \
            kernel.faults.inject("ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY", "ioctl:VFIO_IOMMU_UNMAP_DMA,errno=EINVAL"):
        with pytest.raises(VFIOError) as e:
            map_ram(rig, container)
    assert [c.name for c in calls] == [MAP, UNMAP] and e.value.errno == errno.EINVAL
    assert e.value.message.startswith("vfio_dma_map(0x100000, 0x4000, ") and dma_mappings(kernel) == 0


@pytest.mark.parametrize("code", [errno.EEXIST, errno.ENOSPC, errno.EFAULT])
def test_other_map_dma_errors_are_not_retried(rig, kernel, container, code):
    with kernel.faults.record() as calls, kernel.faults.inject(Fault("ioctl", request="VFIO_IOMMU_MAP_DMA", errno=code)):
        with pytest.raises(VFIOError) as e:
            map_ram(rig, container)
    assert [c.name for c in calls] == [MAP] and e.value.errno == code


# -- the ROM: EINTR and EAGAIN -> read again ---------------------------------------------------------
ROM_REGION = uapi.VFIO_PCI_ROM_REGION_INDEX


def rom_reads(calls) -> list[str]:
    return [c.name for c in calls if c.kind == "pread" and c.region == ROM_REGION]


def test_rom_reads_retry_eintr_and_eagain_and_carry_on_after_a_short_read(rig, kernel):
    rules = [Fault("pread", region=ROM_REGION, errno=errno.EINTR, times=2),
             Fault("pread", region=ROM_REGION, errno=errno.EAGAIN, nth=3),
             Fault("pread", region=ROM_REGION, nth=4, count=0x300)]
    with kernel.faults.record() as calls, kernel.faults.inject(*rules), TraceRecorder() as trace:
        dev = realize_pci(rig, ROM_MSI)
    assert rom_reads(calls) == ["pread region 6+0x0 [0x1000]"] * 4 + ["pread region 6+0x300 [0xd00]"]
    assert [r.hits for r in rules] == [2, 1, 1] and not trace.named("error")
    image = RomMsiFunction().rom
    assert dev.rom == image + b"\xff" * (0x1000 - len(image))


def test_a_rom_read_error_is_reported_and_leaves_no_rom(rig, kernel):
    with kernel.faults.inject(Fault("pread", region=ROM_REGION, errno=errno.EIO)), TraceRecorder() as trace:
        dev = realize_pci(rig, ROM_MSI)
    assert dev.rom is None
    assert "vfio: Error reading device ROM: Input/output error" in [f["message"] for f in trace.named("error")]


# -- MSI: fewer vectors granted -> retry with that many ------------------------------------------------
def msi_enables(calls) -> list[int]:
    return [int(c.detail.split("count=")[1].split()[0]) for c in calls
            if c.kind == "ioctl" and c.detail.startswith(f"index={uapi.VFIO_PCI_MSI_IRQ_INDEX} ") and "EVENTFD" in c.detail]


def fewer(granted: int) -> Fault:
    """The kernel answers the first MSI enable with a positive count, as Linux 6.1's vfio_msi_enable
    does when pci_alloc_irq_vectors gives fewer than asked."""
    return Fault("ioctl", request="VFIO_DEVICE_SET_IRQS", ret=granted,
                 when=lambda call: call.detail.startswith("index=1 ") and "EVENTFD" in call.detail)


def test_msi_granted_fewer_vectors_is_enabled_again_with_that_many(rig, kernel):
    dev = realize_pci(rig, ROM_MSI)
    rig.objects["pci"] = dev
    with kernel.faults.record() as calls, kernel.faults.inject(fewer(2)), TraceRecorder() as trace:
        enable_msi(rig)
    assert msi_enables(calls) == [4, 2]
    assert dev.interrupt == "msi" and dev.nr_vectors == 2 and len(dev.msi_vectors) == 2
    assert dev.vbasedev.eventfds == {v.fd for v in dev.msi_vectors}
    assert len(kernel.vfio_devices[ROM_MSI].msi_ctx) == 2
    assert [f["message"] for f in trace.named("error")] == ["vfio: Error: Failed to enable 4 MSI vectors, retry with 2"]


def test_msi_granted_as_many_as_asked_gives_up_quietly_as_the_seed_does(rig, kernel):
    dev = realize_pci(rig, ROM_MSI)
    rig.objects["pci"] = dev
    with kernel.faults.record() as calls, kernel.faults.inject(fewer(4)), TraceRecorder() as trace:
        enable_msi(rig)
    assert msi_enables(calls) == [4]
    assert dev.interrupt == "none" and dev.nr_vectors == 0 and not dev.vbasedev.eventfds
    assert not trace.named("error")


def test_msi_retries_until_the_kernel_stops_shrinking(rig, kernel):
    dev = realize_pci(rig, ROM_MSI)
    rig.objects["pci"] = dev
    with kernel.faults.record() as calls, kernel.faults.inject(fewer(2)), \
            kernel.faults.inject(Fault("ioctl", request="VFIO_DEVICE_SET_IRQS", nth=2, ret=1,
                                       when=lambda call: call.detail.startswith("index=1 "))):
        enable_msi(rig)
    assert msi_enables(calls) == [4, 2, 1] and dev.interrupt == "msi" and dev.nr_vectors == 1


# -- vfio-ccw: EAGAIN -> write again -----------------------------------------------------------------------
@pytest.fixture
def ccw():
    with FakeKernel("ccw") as kernel:
        rig = Rig(kernel)
        rig.machine.add_ram(0x10000, 0x10000)
        dev = VFIOCCWDevice.realize(rig.space, rig.machine, sysfsdev=CCW_MDEV, css=ChannelSubsystem())
        rig.later(dev.unrealize)
        schib = SCHIB()
        schib.pmcw.flags = css.PMCW_FLAGS_MASK_ENA
        assert dev.sch.msch(schib) is IOInstEnding.CC_EXPECTED
        rig.machine.ram[0].memory[0x100:0x108] = CCW1(css.CCW_CMD_NOOP, 0, 0, 0).pack()
        yield kernel, dev
        rig.teardown()


def start_noop(dev) -> IOInstEnding:
    ctrl0 = css.ORB_CTRL0_MASK_FMT | css.ORB_CTRL0_MASK_PFCH
    return dev.sch.ssch(ORB(0x1234, ctrl0, 0, 0, 0x10100))


@pytest.mark.parametrize("eagains", [1, 3])
def test_ccw_io_region_writes_retry_eagain(ccw, eagains):
    kernel, dev = ccw
    with kernel.faults.inject(Fault("pwrite", region=uapi.VFIO_CCW_CONFIG_REGION_INDEX, errno=errno.EAGAIN,
                                    times=eagains)) as (rule,), TraceRecorder() as trace:
        assert start_noop(dev) is IOInstEnding.CC_EXPECTED
    assert rule.hits == eagains and len(trace.named("vfio_ccw_write_retry")) == eagains
    assert not trace.named("error") and len(kernel.ccw_device("0.0.0313").requests) == 1


def test_ccw_gives_up_on_the_first_error_that_is_not_eagain(ccw):
    kernel, dev = ccw
    rules = [Fault("pwrite", region=0, errno=errno.EAGAIN), Fault("pwrite", region=0, nth=2, errno=errno.EBUSY)]
    with kernel.faults.inject(*rules), TraceRecorder() as trace:
        assert start_noop(dev) is IOInstEnding.CC_BUSY
    assert [f["message"] for f in trace.named("error")] == ["vfio-ccw: write I/O region failed with errno=16"]


def test_ccw_halt_retries_eagain_on_the_async_region(ccw):
    kernel, dev = ccw
    async_region = dev.async_cmd_region.info.index
    with kernel.faults.inject(Fault("pwrite", region=async_region, errno=errno.EAGAIN, times=2)) as (rule,), \
            TraceRecorder() as trace:
        assert dev.handle_halt() == 0
    assert rule.hits == 2 and len(trace.named("vfio_ccw_write_retry")) == 2 and not trace.named("error")
