"""Capability chains: what build_chain lays out, parse_chain must give back, and
a malformed chain from a kernel (or a fake one) must be refused, not followed."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfio_impl import uapi
from vfio_impl.uapi import (
    DmaAvailCap,
    IovaRangeCap,
    MigrationCap,
    MsixMappableCap,
    RegionTypeCap,
    SparseMmapCap,
    UnknownCap,
    build_chain,
    chain_size,
    parse_chain,
)

HEADER = struct.Struct("=HHI")
REGION_START = 32  # sizeof(struct vfio_region_info), already a multiple of 8
IOMMU_START = 24  # sizeof(struct vfio_iommu_type1_info)

REGION_CAPS = [
    SparseMmapCap(((0, 0x1000), (0x3000, 0x5000))),
    SparseMmapCap(()),
    RegionTypeCap(uapi.VFIO_REGION_TYPE_PCI_VENDOR_TYPE | 0x8086,
                  uapi.VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION),
    MsixMappableCap(),
    UnknownCap(0x77, 1, b"12345678"),
]
IOMMU_CAPS = [
    IovaRangeCap(((0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))),
    MigrationCap(1, 0x1000 | 0x200000, 256 << 20),
    DmaAvailCap(65535),
    UnknownCap(0x42, 3, b""),
]


def with_chain(caps, start, kind) -> bytes:
    return bytes(start) + build_chain(caps, start, kind)


def offsets(buf: bytes, first: int) -> list[int]:
    found, offset = [], first
    while offset:
        found.append(offset)
        offset = HEADER.unpack_from(buf, offset)[2]
    return found


@pytest.mark.parametrize(("cap", "kind", "start"),
                         [(cap, "region", REGION_START) for cap in REGION_CAPS]
                         + [(cap, "iommu", IOMMU_START) for cap in IOMMU_CAPS],
                         ids=repr)
def test_each_cap_round_trips_alone(cap, kind, start):
    buf = with_chain([cap], start, kind)
    assert parse_chain(buf, start, kind) == [cap]
    cap_id, version, next_offset = HEADER.unpack_from(buf, start)
    assert next_offset == 0
    if not isinstance(cap, UnknownCap):
        assert (cap_id, version) == (cap.ID, cap.VERSION)


@pytest.mark.parametrize(("caps", "kind", "start"),
                         [(REGION_CAPS, "region", REGION_START), (IOMMU_CAPS, "iommu", IOMMU_START)])
def test_a_whole_chain_round_trips_packed_and_terminated(caps, kind, start):
    chain = build_chain(caps, start, kind)
    assert len(chain) == chain_size(caps, start)
    buf = bytes(start) + chain
    assert parse_chain(buf, start, kind) == caps
    found = offsets(buf, start)
    assert len(found) == len(caps)
    sizes = [len(build_chain([cap], start, kind)) for cap in caps]
    assert found == [start + sum(sizes[:i]) for i in range(len(caps))]
    assert HEADER.unpack_from(buf, found[-1])[2] == 0


def test_region_info_with_a_chain_as_the_kernel_lays_it_out():
    caps = [SparseMmapCap(((0, 0x1000),)), MsixMappableCap()]
    info = uapi.vfio_region_info
    start = -(-info.size // 8) * 8
    reply = info.pack(argsz=start + chain_size(caps, start), flags=uapi.VFIO_REGION_INFO_FLAG_CAPS,
                      index=uapi.VFIO_PCI_BAR0_REGION_INDEX, cap_offset=start, size=0x4000)
    reply += build_chain(caps, start, "region")
    fixed = info.unpack(reply)
    assert fixed.argsz == len(reply) == 32 + 32 + 8
    assert HEADER.unpack_from(reply, 32) == (uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 64)
    assert parse_chain(reply, fixed.cap_offset, "region") == caps


def test_dma_avail_is_not_padded():
    chain = build_chain([DmaAvailCap(5), DmaAvailCap(6)], 24, "iommu")
    assert len(chain) == 12 + 12
    assert HEADER.unpack_from(chain, 0)[2] == 24 + 12


def test_no_chain():
    assert parse_chain(bytes(32), 0, "region") == []
    assert build_chain([], 32, "region") == b""
    assert chain_size([], 32) == 0


def test_ids_are_read_per_kind():
    buf = with_chain([IovaRangeCap(((0, 0xFFF),))], 24, "iommu")
    assert parse_chain(buf, 24, "region") == [SparseMmapCap(((0, 0xFFF),))]


def test_an_unknown_version_is_not_interpreted():
    buf = bytearray(with_chain([RegionTypeCap(1, 1)], 32, "region"))
    struct.pack_into("=H", buf, 34, 2)
    assert parse_chain(buf, 32, "region") == [UnknownCap(uapi.VFIO_REGION_INFO_CAP_TYPE, 2,
                                                         struct.pack("=II", 1, 1))]


def test_class_ids_and_versions():
    assert (SparseMmapCap.ID, RegionTypeCap.ID, MsixMappableCap.ID) == (1, 2, 3)
    assert (IovaRangeCap.ID, MigrationCap.ID, DmaAvailCap.ID) == (1, 2, 3)
    for cls in (SparseMmapCap, RegionTypeCap, MsixMappableCap, IovaRangeCap, MigrationCap, DmaAvailCap):
        assert cls.VERSION == 1


def test_caps_are_frozen_and_normalise_lists():
    cap = SparseMmapCap([[0, 4096]])
    assert cap.areas == ((0, 4096),)
    with pytest.raises(AttributeError):
        cap.areas = ()  # type: ignore[misc]


# --- malformed chains ---

def test_a_cap_pointing_at_itself_is_a_loop():
    buf = bytearray(with_chain([MsixMappableCap()], 32, "region"))
    struct.pack_into("=I", buf, 36, 32)
    with pytest.raises(ValueError, match="loops"):
        parse_chain(buf, 32, "region")


def test_two_caps_pointing_at_each_other_are_a_loop():
    buf = bytearray(with_chain([MsixMappableCap(), MsixMappableCap()], 32, "region"))
    struct.pack_into("=I", buf, 44, 32)
    with pytest.raises(ValueError, match="loops"):
        parse_chain(buf, 32, "region")


@pytest.mark.parametrize("first", [-8, 32, 40, 1 << 31])
def test_a_first_offset_outside_the_buffer(first):
    with pytest.raises(ValueError, match="outside"):
        parse_chain(bytes(36), first, "region")


def test_a_next_offset_outside_the_buffer():
    buf = bytearray(with_chain([RegionTypeCap(1, 1)], 32, "region"))
    struct.pack_into("=I", buf, 36, 4096)
    with pytest.raises(ValueError, match="outside"):
        parse_chain(buf, 32, "region")


@pytest.mark.parametrize(("cap", "kind", "cut"), [
    (SparseMmapCap(((0, 1), (2, 3))), "region", 1),
    (SparseMmapCap(((0, 1), (2, 3))), "region", 20),
    (RegionTypeCap(1, 1), "region", 1),
    (MigrationCap(0, 4096, 8), "iommu", 8),
    (DmaAvailCap(1), "iommu", 1),
    (IovaRangeCap(((0, 1),)), "iommu", 1),
])
def test_a_truncated_cap(cap, kind, cut):
    buf = with_chain([cap], 32, kind)[:-cut]
    with pytest.raises(ValueError, match="truncated"):
        parse_chain(buf, 32, kind)


def test_build_refuses_a_cap_of_the_other_kind_an_unknown_kind_and_a_bad_start():
    with pytest.raises(ValueError, match="not a iommu"):
        build_chain([SparseMmapCap(())], 24, "iommu")
    with pytest.raises(ValueError, match="kind"):
        build_chain([], 24, "device")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_chain([MsixMappableCap()], 20, "region")
    with pytest.raises(ValueError, match="kind"):
        parse_chain(bytes(8), 0, "device")


# --- property: any chain round trips ---

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
pairs = st.lists(st.tuples(u64, u64), max_size=5).map(tuple)
# No known cap has version > 1, so these stay unknown.
unknown = st.builds(UnknownCap, st.integers(0, 0xFFFF), st.integers(2, 0xFFFF),
                    st.integers(0, 4).map(lambda n: bytes(range(8 * n))))
region_cap = st.one_of(st.builds(SparseMmapCap, pairs), st.builds(RegionTypeCap, u32, u32),
                       st.just(MsixMappableCap()), unknown)
iommu_cap = st.one_of(st.builds(IovaRangeCap, pairs), st.builds(MigrationCap, u32, u64, u64),
                      st.builds(DmaAvailCap, u32), unknown)
chains = st.one_of(st.tuples(st.just("region"), st.lists(region_cap, max_size=6)),
                   st.tuples(st.just("iommu"), st.lists(iommu_cap, max_size=6)))


@given(chains, st.integers(1, 32).map(lambda n: 8 * n))
def test_any_chain_round_trips(chain, start):
    kind, caps = chain
    buf = with_chain(caps, start, kind)
    assert len(buf) == start + chain_size(caps, start)
    assert parse_chain(buf, start if caps else 0, kind) == caps
    if caps:
        found = offsets(buf, start)
        assert found[0] == start and found == sorted(found)


def test_type1_info_chain_as_linux_6_1_lays_it_out():
    """Recorded from Debian's 6.1 under QEMU's intel-iommu: caps are not padded to 8."""
    caps = [MigrationCap(0, 0x1000, 0x10000000), DmaAvailCap(65535),
            IovaRangeCap(((0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF)))]
    buf = bytes(24) + build_chain(caps, 24, "iommu")
    assert len(buf) == 116
    assert offsets(buf, 24) == [24, 56, 68]
