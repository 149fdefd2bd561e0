"""AddressSpace.dma_buffer on the fake kernel: what it maps, what it leaves behind on every way out,
and Device.enable_irq as one SET_IRQS."""

import ctypes
import errno
import mmap

import pytest

from fakekernel import FakeKernel, Topology
from fakekernel.faults import Fault, census
from vfio_impl import AddressSpace, Device, VFIOError, uapi

PAGE = mmap.PAGESIZE
EDU = "/sys/bus/pci/devices/0000:00:03.0"
EDU2 = "/sys/bus/pci/devices/0000:00:04.0"


@pytest.fixture
def kernel():
    with FakeKernel(Topology.named("two-groups")) as k:
        yield k


@pytest.fixture
def space(kernel):
    with AddressSpace(kernel) as space:
        yield space


def iommus(kernel):
    return [f.iommu for f in kernel.files.values() if f.kind == "container"]


def test_a_buffer_is_page_rounded_memory_mapped_at_its_iova(kernel, space):
    edu = Device.attach(space, EDU)
    before = census(kernel)
    with space.dma_buffer(100, iova=0x100000) as buf:
        (iommu,) = iommus(kernel)
        (m,) = iommu.mappings()
        assert (m.iova, m.size, m.vaddr, m.readable, m.writable) == (0x100000, PAGE, buf.vaddr, True, True)
        assert buf.vaddr == ctypes.addressof(ctypes.c_char.from_buffer(buf.view))
        buf.view[PAGE - 4:] = b"tail"
        assert iommu.dma_read(0x100000 + PAGE - 4, 4) == b"tail", "the IOMMU does not reach the buffer"
    assert buf.closed and not space.dma_buffers and census(kernel) == before
    edu.close()


def test_a_read_only_buffer_is_mapped_without_write(kernel, space):
    Device.attach(space, EDU)
    with space.dma_buffer(PAGE, iova=0x100000, readonly=True):
        (m,) = iommus(kernel)[0].mappings()
        assert m.readable and not m.writable


def test_without_a_container_there_is_nothing_to_map_into(space):
    with pytest.raises(VFIOError) as e:
        space.dma_buffer(PAGE, iova=0x100000)
    assert e.value.errno == errno.ENODEV and "attach a device first" in e.value.message


def test_an_empty_buffer_is_einval(space):
    Device.attach(space, EDU)
    with pytest.raises(VFIOError) as e:
        space.dma_buffer(0, iova=0x100000)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("fault", [Fault("ioctl", request="VFIO_IOMMU_MAP_DMA", errno=errno.ENOMEM),
                                   Fault("ioctl", request="VFIO_IOMMU_MAP_DMA", errno=errno.EFAULT)])
def test_a_refused_map_leaves_nothing(kernel, space, fault):
    Device.attach(space, EDU)
    before = census(kernel)
    with kernel.faults.inject(fault), pytest.raises(VFIOError) as e:
        space.dma_buffer(PAGE, iova=0x100000)
    assert e.value.errno == fault.errno and "vfio_dma_map(0x100000" in e.value.message
    assert not space.dma_buffers and census(kernel) == before


def two_containers(kernel, space):
    """edu in group 3 and in group 4, each in a container of its own: the second group's try to
    join the first container is refused."""
    first = Device.attach(space, EDU)
    with kernel.faults.inject(Fault("ioctl", request="VFIO_GROUP_SET_CONTAINER", errno=errno.EINVAL)):
        second = Device.attach(space, EDU2)
    assert len(space.containers) == 2
    return first, second


def test_a_buffer_maps_into_every_container_and_goes_with_the_last(kernel, space):
    first, second = two_containers(kernel, space)
    buf = space.dma_buffer(PAGE, iova=0x100000)
    assert [len(iommu) for iommu in iommus(kernel)] == [1, 1]
    first.close()
    assert not buf.closed and buf.containers == [second.group.container]
    buf.view[:4] = b"live"
    second.close()
    assert buf.closed and not space.dma_buffers and census(kernel)["dma mappings"] == 0


def test_a_map_refused_by_the_second_container_unmaps_the_first(kernel, space):
    two_containers(kernel, space)
    with kernel.faults.inject(Fault("ioctl", request="VFIO_IOMMU_MAP_DMA", nth=2, errno=errno.ENOSPC)), \
            pytest.raises(VFIOError):
        space.dma_buffer(PAGE, iova=0x100000)
    assert not space.dma_buffers and census(kernel)["dma mappings"] == 0


def test_closing_the_space_releases_open_buffers(kernel):
    before = census(kernel)
    with AddressSpace(kernel) as space:
        Device.attach(space, EDU)
        buf = space.dma_buffer(4 * PAGE, iova=0x100000)
    assert buf.closed and census(kernel) == before


def test_a_failed_unmap_still_frees_the_buffer_and_says_so(kernel, space):
    Device.attach(space, EDU)
    buf = space.dma_buffer(PAGE, iova=0x100000)
    with kernel.faults.inject(Fault("ioctl", request="VFIO_IOMMU_UNMAP_DMA", errno=errno.EIO)), \
            pytest.raises(VFIOError) as e:
        buf.close()
    assert e.value.errno == errno.EIO and buf.closed and not space.dma_buffers
    with pytest.raises(ValueError):
        buf.view[0]


def test_a_view_the_caller_still_holds_does_not_stop_close(kernel, space):
    Device.attach(space, EDU)
    buf = space.dma_buffer(PAGE, iova=0x100000)
    held = buf.view[:4]
    buf.close()
    assert buf.closed and census(kernel)["dma mappings"] == 0
    held[:] = b"mine"   # the pages live on with the view, outside the IOMMU
    assert bytes(held) == b"mine"


def test_enable_irq_is_one_set_irqs(kernel, space):
    edu = Device.attach(space, EDU)
    fds = [edu.new_eventfd()]
    with kernel.faults.record() as calls:
        edu.enable_irq(uapi.VFIO_PCI_MSI_IRQ_INDEX, fds)
    assert [c.name for c in calls] == ["ioctl VFIO_DEVICE_SET_IRQS index=1 start=0 count=1 TRIGGER EVENTFD"]
