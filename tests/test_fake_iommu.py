"""The fake type1 IOMMU on its own: ordering, limits, translation across mappings, faults."""

import ctypes
import errno
import mmap
import random

import pytest

from fakekernel.iommu import Type1IOMMU, user_range_mapped

PAGE = mmap.PAGESIZE


@pytest.fixture
def mem():
    m = mmap.mmap(-1, 8 * PAGE)
    yield m, ctypes.addressof(ctypes.c_char.from_buffer(m))
    m.close()


def test_translation_spans_adjacent_mappings(mem):
    m, base = mem
    io = Type1IOMMU()
    io.map(0x2000, PAGE, base + PAGE, True, True)
    io.map(0x1000, PAGE, base, True, True)
    assert io.dma_write(0x1FF0, b"x" * 32)
    assert m[PAGE - 16:PAGE + 16] == b"x" * 32
    assert io.dma_read(0x1FF0, 32) == b"x" * 32
    assert [x.iova for x in io.mappings()] == [0x1000, 0x2000]


def test_faults_are_recorded_not_raised(mem):
    _, base = mem
    io = Type1IOMMU()
    io.map(0x1000, PAGE, base, True, False)
    assert io.dma_read(0x5000, 4) is None
    assert not io.dma_write(0x1000, b"1234")
    io.map(0x3000, PAGE, base, False, True)
    assert io.dma_read(0x3000, 4) is None
    assert [f.reason for f in io.faults] == ["unmapped", "write to a read-only mapping", "read from a write-only mapping"]


def test_overlap_limit_and_pinning(mem):
    _, base = mem
    io = Type1IOMMU(dma_entry_limit=1)
    io.map(0x1000, 2 * PAGE, base, True, True)
    with pytest.raises(OSError) as exc:
        io.map(0x2000, PAGE, base, True, True)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(OSError) as exc:
        io.map(0x8000, PAGE, base, True, True)
    assert exc.value.errno == errno.ENOSPC
    io2 = Type1IOMMU()
    with pytest.raises(OSError) as exc:
        io2.map(0x1000, PAGE, 0x1000, True, True)
    assert exc.value.errno == errno.EFAULT


def test_unmap_ranges_and_partials(mem):
    _, base = mem
    io = Type1IOMMU()
    for i in range(4):
        io.map(0x10000 * (i + 1), PAGE, base, True, True)
    io.map(0x100000, 4 * PAGE, base, True, True)
    assert io.first_partial(0x101000, PAGE) and io.first_partial(0x100000, PAGE)
    assert not io.first_partial(0x100000, 4 * PAGE)
    assert io.unmap(0x10000, 0x20000) == 2 * PAGE
    assert io.dma_avail == io.dma_entry_limit - 3
    assert io.unmap_all() == 6 * PAGE and len(io) == 0


def test_memory_unmapped_by_the_process_is_a_fault_not_a_crash():
    m = mmap.mmap(-1, PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    io = Type1IOMMU()
    io.map(0x1000, PAGE, base, True, True)
    m.close()
    assert not user_range_mapped(base, PAGE)
    assert io.dma_read(0x1000, 4) is None
    assert io.faults[-1].reason == "the process unmapped the memory behind the mapping"


def test_many_mappings_across_blocks_agree_with_a_plain_model(mem):
    """More mappings than one block of SortedMappings holds, mapped in random order and unmapped
    by ranges that cross blocks and empty some, checked against a dict."""
    _, base = mem
    rnd = random.Random(5)
    io = Type1IOMMU(dma_entry_limit=10_000)
    model = {}
    pages = list(range(6000))
    rnd.shuffle(pages)
    for page in pages:
        io.map(2 * page * PAGE, PAGE, base, True, False)
        model[2 * page * PAGE] = PAGE
    for _ in range(300):
        first = rnd.randrange(12_000) * PAGE
        size = rnd.choice((1, 2, 50, 2500)) * PAGE
        gone = [iova for iova in model if first <= iova < first + size]
        assert io.unmap(first, size) == PAGE * len(gone)
        for iova in gone:
            del model[iova]
    assert len(io) == len(model) and [m.iova for m in io.mappings()] == sorted(model)
    for page in range(0, 12_000, 7):
        iova = page * PAGE + 8
        found = io.find(iova)
        assert (found.iova if found else None) == (page * PAGE if page * PAGE in model else None)
        # [iova, iova + 2 pages) touches this page and the next two.
        assert io.overlaps(iova, 2 * PAGE) == any((page + d) * PAGE in model for d in (0, 1, 2))
