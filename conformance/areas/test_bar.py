"""BARs: what vfio-pci reports for each, pread/pwrite against mmap, the MSI-X table hole, the
I/O BAR, and how the PCI flavour maps and accesses them for a guest."""

import errno
import mmap

import pytest

from vfio_impl import VFIOError, uapi
from vfio_impl.core.trace import TraceRecorder

from ..models import MODELS, access, bar_of, each  # noqa: F401 (access is a fixture)

PAGE = mmap.PAGESIZE
EDU_ID, EDU_LIVENESS, EDU_FACT, EDU_STATUS = 0x00, 0x04, 0x08, 0x20
E1000E_STATUS, E1000E_RAL0 = 0x08, 0x5400
IOADDR, IODATA = 0x00, 0x04
MSIX_BAR, PBA = 3, 0x2000
# A register that keeps what is written, per device: (BAR, offset, what a read gives back).
SCRATCH = {"edu": (0, EDU_LIVENESS, lambda v: ~v & 0xFFFFFFFF),
           "ivshmem": (2, 0x100, lambda v: v),
           "ivshmem-doorbell": (2, 0x100, lambda v: v),
           "e1000e": (0, E1000E_RAL0, lambda v: v)}


@each()
def test_region_info_of_each_bar(model, raw):
    _, _, d = raw.open_device()
    for index in range(6):
        info, _ = raw.region_info(d, index)
        assert (index, info.flags, info.size, info.offset) == (index, *bar_of(model, index)[:2], index << 40)


@each()
def test_mmap_and_pread_see_the_same_register(model, vfio, raw):
    bar, off, readback = SCRATCH[model.name]
    _, _, d = raw.open_device()
    page = off & ~(PAGE - 1)
    m = vfio.host.mmap(d, PAGE, (bar << 40) + page)
    try:
        m[off - page:off - page + 4] = (0x5A0F1E2D).to_bytes(4, "little")
        assert raw.bar_read(d, bar, off) == readback(0x5A0F1E2D)
        raw.bar_write(d, bar, off, 0x1234ABCD)
        assert int.from_bytes(m[off - page:off - page + 4], "little") == readback(0x1234ABCD)
    finally:
        m.close()


# What narrow reads give after 0x11223344 is stored, and the dword after 0xAA goes to byte 1:
# ivshmem's RAM is byte-addressed; e1000e registers are 4 bytes wide in QEMU, so a narrow read
# gets the register's low bytes and a narrow write stores its value in the whole register.
NARROW = {"ivshmem": (0x33, 0x1122, 0x1122AA44), "e1000e": (0x44, 0x3344, 0xAA)}


@each("ivshmem", "e1000e")
@pytest.mark.parametrize("mapped", [True, False], ids=["mmap", "trapped"])
def test_guest_accesses_are_sized_and_little_endian(model, vfio_pci, mapped):
    dev = vfio_pci()
    bar, off, _ = SCRATCH[model.name]
    dev.bars[bar].region.mmap_enabled = mapped
    byte1, half2, after = NARROW[model.name]
    dev.bar_write(bar, off, 0x11223344, 4)
    assert dev.bar_read(bar, off, 4) == 0x11223344
    assert (dev.bar_read(bar, off + 1, 1), dev.bar_read(bar, off + 2, 2)) == (byte1, half2)
    dev.bar_write(bar, off + 1, 0xAA, 1)
    assert dev.bar_read(bar, off, 4) == after
    assert dev.mmap_enabled(bar) is mapped


@each()
def test_register_handle_follows_the_mmaps_off_on_and_away(model, vfio_pci):
    """A Register reads and writes what its Region does; with the mmaps off or unmapped it traps,
    and it never touches a view its region has released."""
    dev = vfio_pci()
    bar, off, readback = SCRATCH[model.name]
    region = dev.bars[bar].region
    reg = region.register(off)
    for value, enabled in ((0x5A0F1E2D, True), (0x1234ABCD, False), (0x0BADF00D, True)):
        region.mmap_enabled = enabled
        reg.write(value)
        assert (reg.read(), region.read(off, 4)) == (readback(value), readback(value))
        if not enabled:
            assert not reg.mapped
    if model.name.startswith("ivshmem"):
        assert reg.mapped, "BAR2 is memory on both backends: its register is a load of the mmap"
    region.munmap()
    assert not reg.mapped
    reg.write(0x600DCAFE)
    assert reg.read() == readback(0x600DCAFE)


@each("ivshmem")
def test_register_handle_limits(model, vfio_pci):
    """Narrow registers keep Region.read's mask; a register outside the region or of an odd
    size is refused when the handle is made, not on its first access."""
    dev = vfio_pci()
    bar, off, _ = SCRATCH[model.name]
    region = dev.bars[bar].region
    region.register(off).write(0x11223344)
    assert (region.register(off + 1, 1).read(), region.register(off + 2, 2).read()) == (0x33, 0x1122)
    assert region.register(off, 8).read() & 0xFFFFFFFF == 0x11223344
    for addr, size in ((region.size - 2, 4), (-4, 4), (off, 3)):
        with pytest.raises(VFIOError) as e:
            region.register(addr, size)
        assert e.value.errno == errno.EINVAL


@each("e1000e")
def test_msix_table_is_a_hole_for_pread_but_mappable(model, raw):
    """The kernel owns the table: pread sees all ones, yet MSIX_MAPPABLE lets it be mmapped."""
    _, _, d = raw.open_device()
    info, buf = raw.region_info(d, MSIX_BAR, argsz=256)
    assert {type(cap) for cap in uapi.parse_chain(buf, info.cap_offset, "region")} == {uapi.MsixMappableCap}
    assert raw.bar_read(d, MSIX_BAR, 0, 4) == 0xFFFFFFFF
    assert raw.bar_read(d, MSIX_BAR, PBA, 4) == 0


@each("e1000e")
def test_region_info_without_room_for_the_chain(model, raw):
    """The caps flag, the argsz the chain needs and cap_offset 0; asked again with that argsz, the
    same answer with the chain right after the struct."""
    _, _, d = raw.open_device()
    info, _ = raw.region_info(d, MSIX_BAR)
    size = uapi.vfio_region_info.size
    assert info.flags & uapi.VFIO_REGION_INFO_FLAG_CAPS and info.argsz > size and info.cap_offset == 0
    again, buf = raw.region_info(d, MSIX_BAR, argsz=info.argsz)
    assert (again.argsz, again.flags, again.cap_offset, again.size) == (info.argsz, info.flags, size, info.size)
    assert [type(cap) for cap in uapi.parse_chain(buf, again.cap_offset, "region")] == [uapi.MsixMappableCap]


@each("e1000e")
def test_guest_msix_table_is_emulated_over_a_full_mapping(model, vfio_pci):
    dev = vfio_pci()
    bar = dev.bars[MSIX_BAR]
    assert [(a.offset, a.size) for a in bar.areas] == [(0, bar.size)], "MSIX_MAPPABLE leaves no hole"
    assert (dev.bar_read(MSIX_BAR, 0, 4), dev.bar_read(MSIX_BAR, 12, 4)) == (0, 1)
    dev.bar_write(MSIX_BAR, 0, 0xFEE01000, 4)
    assert dev.bar_read(MSIX_BAR, 0, 4) == 0xFEE01000
    assert bar.region.pread(0, 4) == b"\xff" * 4


@each()
def test_flavour_maps_implemented_bars_and_skips_the_rest(model, vfio_pci):
    """Absent BARs and the upper half of a 64-bit BAR have no region: nothing to map or type."""
    dev = vfio_pci()
    assert [bar.size for bar in dev.bars] == [bar_of(model, i)[1] for i in range(6)]
    mappable = [i for i in range(6) if bar_of(model, i)[0] & uapi.VFIO_REGION_INFO_FLAG_MMAP]
    assert [bar.nr for bar in dev.bars if bar.areas] == mappable


@each()
def test_flavour_takes_each_bar_type_from_its_register(model, vfio_pci):
    dev = vfio_pci()
    for bar in dev.bars:
        flags, size, sized = bar_of(model, bar.nr)
        if size:
            io = bool(sized & 1)
            expect = (io, not io and sized & 6 == 4, not io and bool(sized & 8))
            assert (bar.nr, bar.ioport, bar.mem64, bar.prefetch) == (bar.nr, *expect)


@each("e1000e")
def test_io_bar_reaches_the_registers_through_ioaddr_and_iodata(model, access):
    access.bar_write(2, IOADDR, E1000E_STATUS)
    assert access.bar_read(2, IOADDR) == E1000E_STATUS
    assert access.bar_read(2, IODATA) == access.bar_read(0, E1000E_STATUS)


@each("edu")
def test_edu_factorial_through_the_mmap_is_one_write(model, vfio_pci):
    """edu ignores a factorial written while it computes: a store split in two leaves 0! behind."""
    dev = vfio_pci()
    assert dev.mmap_enabled(0)
    dev.bar_write(0, EDU_FACT, 10, 4)
    while dev.bar_read(0, EDU_STATUS, 4) & 1:
        pass
    assert dev.bar_read(0, EDU_FACT, 4) == 3628800


@each("edu")
@pytest.mark.parametrize("size", [1, 2])
def test_edu_narrow_accesses_read_zero_and_are_dropped(model, access, size):
    """edu takes 4- and 8-byte accesses only; QEMU's memory core answers the rest as unassigned."""
    access.bar_write(0, EDU_LIVENESS, 0x0F0F0F0F)
    assert access.bar_read(0, EDU_ID, size) == 0
    access.bar_write(0, EDU_LIVENESS, 0x12, size)
    assert access.bar_read(0, EDU_LIVENESS) == 0xF0F0F0F0


@each("edu")
def test_a_failed_guest_access_is_reported_not_raised(model, vfio_pci):
    dev = vfio_pci()
    end = MODELS["edu"].bars[0][1]
    with TraceRecorder() as tr:
        assert dev.bar_read(0, end, 4) == 0xFFFFFFFF
        dev.bar_write(0, end, 1, 4)
    assert [e["message"].split(" failed")[0] for e in tr.named("error")] == [
        f"vfio_bar_read(BAR0+{end:#x}, 4)", f"vfio_bar_write(BAR0+{end:#x}, 0x1, 4)"]
    assert dev.bar_read(0, EDU_ID, 4) == 0x010000ED
