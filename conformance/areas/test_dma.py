"""The type1 IOMMU: map/unmap rules, the info caps, and edu DMA through real translation."""

import ctypes
import errno
import itertools
import mmap

import pytest

from vfio_impl import AddressSpace, Device, Machine, VFIOError, uapi

from ..raw import chain_offsets, errno_of, profile_of

pytestmark = pytest.mark.vfio(device="edu")
PAGE = mmap.PAGESIZE
RW = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE


def address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.fixture
def memory():
    m = mmap.mmap(-1, 16 * PAGE)
    yield m
    m.close()


def map_dma(vfio, c, iova, size, vaddr, flags=RW):
    vfio.host.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA,
                    uapi.vfio_iommu_type1_dma_map.pack(flags=flags, vaddr=vaddr, iova=iova, size=size))


def unmap_dma(vfio, c, iova, size, flags=0) -> int:
    buf = uapi.vfio_iommu_type1_dma_unmap.pack(flags=flags, iova=iova, size=size)
    vfio.host.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, buf)
    return uapi.vfio_iommu_type1_dma_unmap.unpack(buf).size


def edu_dma(bar, src: int, dst: int, count: int, to_ram: bool) -> None:
    """One transfer of edu's engine, waited for: QEMU runs it off a 100 ms timer."""
    for reg, value in ((0x80, src), (0x88, dst), (0x90, count), (0x98, 0x1 | (0x2 if to_ram else 0))):
        bar.write(reg, value, 4)
    while bar.read(0x98, 4) & 1:
        pass


@pytest.fixture
def edu(vfio, vfio_device):
    """edu attached through vfio_impl, memory decode and bus master on: (address space, device, BAR0)."""
    with AddressSpace(vfio.host) as space:
        dev = Device.attach(space, vfio_device.sysfs)
        cfg = dev.region(uapi.VFIO_PCI_CONFIG_REGION_INDEX)
        cfg.write(4, cfg.read(4, 2) | 0x6, 2)
        yield space, dev, dev.region(0)


def iommu_info(vfio, c, argsz: int = 1024):
    """(info, its capabilities, the buffer) for a GET_INFO with `argsz`."""
    buf = bytearray(max(argsz, uapi.vfio_iommu_type1_info.size))
    uapi.vfio_iommu_type1_info.pack_into(buf, 0, argsz=argsz)
    vfio.host.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf)
    info = uapi.vfio_iommu_type1_info.unpack(buf)
    return info, uapi.parse_chain(buf, info.cap_offset, "iommu") if info.cap_offset else [], buf


def cap_size(cap) -> int:
    """A type1 capability's struct: the IOVA range cap grows by 16 bytes a range."""
    return {uapi.MigrationCap: 32, uapi.DmaAvailCap: 12}.get(type(cap)) or 16 + 16 * len(cap.ranges)


def cap_layout(caps, align: int) -> list[int]:
    """Where vfio_info_cap_add puts each capability after the info struct, each rounded up to
    `align`, and last where the chain ends: the argsz it needs."""
    return list(itertools.accumulate((-(-cap_size(cap) // align) * align for cap in caps),
                                     initial=uapi.vfio_iommu_type1_info.size))


def test_map_and_unmap(vfio, raw, memory):
    c, _ = raw.setup()
    map_dma(vfio, c, 0x100000, 4 * PAGE, address(memory))
    assert unmap_dma(vfio, c, 0x100000, 4 * PAGE) == 4 * PAGE


def test_info_reports_page_sizes_and_caps(vfio, raw):
    c, _ = raw.setup()
    info, caps, _ = iommu_info(vfio, c)
    assert info.flags & uapi.VFIO_IOMMU_INFO_PGSIZES and info.iova_pgsizes & PAGE
    assert {type(cap) for cap in caps} >= {uapi.DmaAvailCap, uapi.IovaRangeCap}


def test_info_without_room_for_caps_asks_for_argsz(vfio, raw):
    c, _ = raw.setup()
    buf = uapi.vfio_iommu_type1_info.pack()
    vfio.host.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf)
    info = uapi.vfio_iommu_type1_info.unpack(buf)
    assert info.argsz > uapi.vfio_iommu_type1_info.size and info.cap_offset == 0


def test_info_chain_is_laid_out_as_the_kernel_lays_it_out(vfio, raw):
    """Each capability after the last, rounded up to the profile's info_cap_align: back to back on
    6.1 (argsz 116, the IOVA ranges at 68), on 8 bytes on 6.12 (DMA_AVAIL's 12 bytes take 16, so
    argsz 120 and the IOVA ranges at 72)."""
    c, _ = raw.setup()
    needed = iommu_info(vfio, c, uapi.vfio_iommu_type1_info.size)[0].argsz
    info, caps, buf = iommu_info(vfio, c)
    assert [type(cap) for cap in caps] == [uapi.MigrationCap, uapi.DmaAvailCap, uapi.IovaRangeCap]
    layout = cap_layout(caps, profile_of(vfio).info_cap_align)
    assert chain_offsets(buf, info.cap_offset) == layout[:-1] and needed == layout[-1]


def test_info_with_argsz_for_the_caps_back_to_back(vfio, raw):
    """The chain goes in only when argsz covers it, padding included: 6.1's 116 is enough there;
    on 6.12 it is 4 bytes short, so the caps flag, argsz 120 and cap_offset 0 come back."""
    c, _ = raw.setup()
    caps = iommu_info(vfio, c)[1]
    packed, needed = cap_layout(caps, 1)[-1], cap_layout(caps, profile_of(vfio).info_cap_align)[-1]
    info = iommu_info(vfio, c, packed)[0]
    answer = (packed, uapi.vfio_iommu_type1_info.size) if packed >= needed else (needed, 0)
    assert info.flags & uapi.VFIO_IOMMU_INFO_CAPS and (info.argsz, info.cap_offset) == answer


def test_dma_avail_counts_mappings(vfio, raw, memory):
    c, _ = raw.setup()
    before = next(cap for cap in iommu_info(vfio, c)[1] if isinstance(cap, uapi.DmaAvailCap)).avail
    map_dma(vfio, c, 0x100000, PAGE, address(memory))
    after = next(cap for cap in iommu_info(vfio, c)[1] if isinstance(cap, uapi.DmaAvailCap)).avail
    assert after == before - 1


def test_unmap_of_an_empty_range(vfio, raw):
    c, _ = raw.setup()
    assert unmap_dma(vfio, c, 0x100000, PAGE) == 0


def test_v2_refuses_to_split_a_mapping(vfio, raw, memory):
    c, _ = raw.setup(uapi.VFIO_TYPE1v2_IOMMU)
    map_dma(vfio, c, 0x100000, 4 * PAGE, address(memory))
    assert errno_of(unmap_dma, vfio, c, 0x100000, PAGE) == errno.EINVAL
    assert errno_of(unmap_dma, vfio, c, 0x101000, 3 * PAGE) == errno.EINVAL


def test_v1_unmap_inside_a_mapping_unmaps_nothing(vfio, raw, memory):
    c, _ = raw.setup(uapi.VFIO_TYPE1_IOMMU)
    map_dma(vfio, c, 0x100000, 4 * PAGE, address(memory))
    assert unmap_dma(vfio, c, 0x101000, PAGE) == 0
    assert unmap_dma(vfio, c, 0x100000, PAGE) == 4 * PAGE


def test_unmap_all(vfio, raw, memory):
    c, _ = raw.setup()
    map_dma(vfio, c, 0x100000, PAGE, address(memory))
    map_dma(vfio, c, 0x200000, PAGE, address(memory) + PAGE)
    assert unmap_dma(vfio, c, 0, 0, uapi.VFIO_DMA_UNMAP_FLAG_ALL) == 2 * PAGE


def test_overlapping_map(vfio, raw, memory):
    c, _ = raw.setup()
    map_dma(vfio, c, 0x100000, 2 * PAGE, address(memory))
    assert errno_of(map_dma, vfio, c, 0x101000, 2 * PAGE, address(memory)) == errno.EEXIST


def test_closing_the_group_drops_the_mappings(vfio, raw, memory):
    c, g = raw.setup()
    map_dma(vfio, c, 0x100000, PAGE, address(memory))
    raw.close_fd(g)
    g = raw.group()
    raw.set_container(g, c)
    vfio.host.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    map_dma(vfio, c, 0x100000, PAGE, address(memory))


@pytest.mark.vfio(device="edu", destructive=True)
def test_edu_dma_round_trip(vfio, raw, memory):
    """RAM -> edu buffer -> RAM through the IOMMU, with a pattern only the DMA can carry."""
    c, _, d = raw.open_device()
    raw.enable_device(d, master=True)
    map_dma(vfio, c, 0x100000, 2 * PAGE, address(memory))
    pattern = bytes(range(256)) * 2
    memory[0:512] = pattern
    for reg, value in ((0x80, 0x100000), (0x88, 0x40000), (0x90, 512), (0x98, 1)):
        raw.bar_write(d, 0, reg, value)
    while raw.bar_read(d, 0, 0x98) & 1:
        pass
    for reg, value in ((0x80, 0x40000), (0x88, 0x101000), (0x90, 512), (0x98, 1 | 2)):
        raw.bar_write(d, 0, reg, value)
    while raw.bar_read(d, 0, 0x98) & 1:
        pass
    assert memory[PAGE:PAGE + 512] == pattern


@pytest.mark.vfio(device="edu", destructive=True)
def test_edu_dma_from_guest_ram_via_the_listener(vfio, vfio_device):
    """The memory listener maps guest RAM at its guest physical address; edu DMAs from it."""
    with AddressSpace(vfio.host, Machine()) as space:
        ram = space.machine.add_ram(0x200000, 4 * PAGE)
        dev = Device.attach(space, vfio_device.sysfs)
        assert dev.group.container.mappings == {0x200000: 4 * PAGE}
        cfg, bar = dev.region(uapi.VFIO_PCI_CONFIG_REGION_INDEX), dev.region(0)
        cfg.write(4, cfg.read(4, 2) | 0x6, 2)
        ram.memory[0:8] = b"guestram"
        edu_dma(bar, 0x200000, 0x40000, 8, to_ram=False)
        edu_dma(bar, 0x40000, 0x201000, 8, to_ram=True)
        assert ram.memory[PAGE:PAGE + 8] == b"guestram"
        dev.close()


def test_dma_to_an_unmapped_iova_is_a_recorded_fault(vfio, fake_kernel, raw):
    c, _, d = raw.open_device()
    raw.enable_device(d, master=True)
    for reg, value in ((0x80, 0x40000), (0x88, 0x300000), (0x90, 64), (0x98, 3)):
        raw.bar_write(d, 0, reg, value)
    iommu = fake_kernel.files[c].iommu
    assert iommu.faults and iommu.faults[-1].iova == 0x300000 and iommu.faults[-1].write


def test_dma_into_a_read_only_mapping_faults(vfio, fake_kernel, raw, memory):
    c, _, d = raw.open_device()
    raw.enable_device(d, master=True)
    map_dma(vfio, c, 0x100000, PAGE, address(memory), uapi.VFIO_DMA_MAP_FLAG_READ)
    memory[0:4] = b"keep"
    for reg, value in ((0x80, 0x40000), (0x88, 0x100000), (0x90, 4), (0x98, 3)):
        raw.bar_write(d, 0, reg, value)
    assert memory[0:4] == b"keep"
    assert fake_kernel.files[c].iommu.faults[-1].reason == "write to a read-only mapping"


@pytest.mark.vfio(device="edu", destructive=True)
def test_dma_buffer_round_trip(edu):
    """space.dma_buffer is memory and its MAP_DMA in one call: edu reads it and writes it back."""
    space, dev, bar = edu
    with space.dma_buffer(2 * PAGE, iova=0x100000) as buf:
        assert dev.group.container.mappings == {0x100000: 2 * PAGE}
        pattern = bytes(range(256)) * 2
        buf.view[:512] = pattern
        edu_dma(bar, 0x100000, 0x40000, 512, to_ram=False)
        edu_dma(bar, 0x40000, 0x100000 + PAGE, 512, to_ram=True)
        assert buf.view[PAGE:PAGE + 512] == pattern
    assert dev.group.container.mappings == {}


@pytest.mark.vfio(device="edu", destructive=True)
def test_read_only_dma_buffer_keeps_device_writes_out(edu):
    space, _, bar = edu
    with space.dma_buffer(PAGE, iova=0x100000) as source, \
            space.dma_buffer(PAGE, iova=0x200000, readonly=True) as target:
        source.view[:4] = b"edu!"
        target.view[:4] = b"keep"
        edu_dma(bar, 0x100000, 0x40000, 4, to_ram=False)
        edu_dma(bar, 0x200000, 0x40004, 4, to_ram=False)
        edu_dma(bar, 0x40000, 0x200000, 4, to_ram=True)
        edu_dma(bar, 0x40004, 0x100000, 4, to_ram=True)
        assert target.view[:4] == b"keep" and source.view[:4] == b"keep", "the device read it but wrote it"


def test_closing_a_dma_buffer_unmaps_its_iova(edu):
    space, _, _ = edu
    buf = space.dma_buffer(PAGE, iova=0x100000)
    with pytest.raises(VFIOError) as e:
        space.dma_buffer(PAGE, iova=0x100000)
    assert e.value.errno == errno.EEXIST and space.dma_buffers == [buf]
    buf.close()
    buf.close()
    with space.dma_buffer(PAGE, iova=0x100000) as again:
        assert again.vaddr != 0 and again.size == PAGE


def test_the_last_device_out_takes_its_dma_buffers(vfio, vfio_device):
    with AddressSpace(vfio.host) as space:
        dev = Device.attach(space, vfio_device.sysfs)
        buf = space.dma_buffer(100, iova=0x100000)
        assert buf.size == PAGE, "MAP_DMA takes whole pages"
        dev.close()
        assert buf.closed and not space.dma_buffers
        with pytest.raises(ValueError):
            buf.view[0]
        dev = Device.attach(space, vfio_device.sysfs)
        with space.dma_buffer(PAGE, iova=0x100000):
            assert dev.group.container.mappings == {0x100000: PAGE}
