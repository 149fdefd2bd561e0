"""Layouts must be byte-for-byte what cffi's C layout rules give, with a fast packer."""

import operator
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfio_impl import uapi
from vfio_impl.uapi import STRUCTS, Layout, ffi

ALL = sorted(STRUCTS.values(), key=operator.attrgetter("name"))
ids = operator.attrgetter("name")


def test_one_layout_per_declared_struct():
    assert set(STRUCTS) == set(ffi.list_types()[1])
    for name, layout in STRUCTS.items():
        assert getattr(uapi, name) is layout
        assert layout.name == name


@pytest.mark.parametrize("layout", ALL, ids=ids)
def test_sizes_agree_with_cffi(layout):
    assert layout.size == ffi.sizeof(f"struct {layout.name}")
    assert layout.struct.size == layout.size
    assert layout.struct.format.startswith("=")
    assert len(layout.pack()) == layout.size


@pytest.mark.parametrize("layout", ALL, ids=ids)
def test_offsets_agree_with_cffi(layout):
    ctype = f"struct {layout.name}"
    assert layout.offsets == {name: ffi.offsetof(ctype, name) for name, _ in ffi.typeof(ctype).fields}
    for field in layout.fields:
        assert layout.offsetof(field) == ffi.offsetof(ctype, *field.split("."))


def _codes(layout: Layout) -> list[str]:
    """The struct codes of the fields, padding left out."""
    return [code for code in re.findall(r"\d*[a-zA-Z]", layout.struct.format[1:]) if code[-1] != "x"]


def _values(layout: Layout, draw) -> dict:
    values = {}
    for field, code in zip(layout.fields, _codes(layout), strict=True):
        if code.endswith("s"):
            n = int(code[:-1])
            values[field] = draw(st.binary(min_size=n, max_size=n))
        else:
            bits = 8 * struct.calcsize("=" + code)
            signed = code.islower()
            values[field] = draw(st.integers(-(1 << bits - 1) if signed else 0,
                                             (1 << bits - signed) - 1))
    return values


@st.composite
def filled(draw):
    layout = draw(st.sampled_from(ALL))
    return layout, _values(layout, draw)


def _cffi_bytes(layout, values: dict) -> bytes:
    """The same values written member by member through cffi, as C would."""
    obj = ffi.new(f"struct {layout.name} *")
    for field, value in values.items():
        *path, last = field.split(".")
        target = obj
        for part in path:
            target = getattr(target, part)
        current = getattr(target, last)
        if isinstance(value, bytes):
            value = list(value)
        elif isinstance(current, ffi.CData) and ffi.typeof(current).kind == "pointer":
            value = ffi.cast(ffi.typeof(current), value)
        setattr(target, last, value)
    return bytes(ffi.buffer(obj))


@given(filled())
def test_pack_matches_cffi_and_round_trips(case):
    layout, values = case
    packed = layout.pack(**values)
    assert bytes(packed) == _cffi_bytes(layout, values)
    assert layout.unpack(packed) == layout.tuple(*values.values())
    assert layout.unpack(packed)._asdict() == {name: values[field] for name, field
                                               in zip(layout.tuple._fields, layout.fields)}


def test_argsz_defaults_to_the_struct_size():
    assert uapi.vfio_region_info.unpack(uapi.vfio_region_info.pack(index=2)).argsz == 32
    assert uapi.vfio_irq_set.unpack(uapi.vfio_irq_set.pack()).argsz == uapi.vfio_irq_set.size
    assert uapi.vfio_irq_set.unpack(uapi.vfio_irq_set.pack(argsz=24)).argsz == 24
    assert uapi.vfio_iova_range.pack() == bytes(16)  # no argsz: all zero


def test_region_info_bytes():
    packed = uapi.vfio_region_info.pack(flags=uapi.VFIO_REGION_INFO_FLAG_READ, index=7,
                                        size=0x100, offset=0x70000000000)
    assert packed == struct.pack("=IIIIQQ", 32, 1, 7, 0, 0x100, 0x70000000000)


def test_pack_into_at_an_offset_leaves_the_rest_alone():
    buf = bytearray(b"\xee" * 40)
    uapi.vfio_irq_info.pack_into(buf, 8, index=uapi.VFIO_PCI_MSIX_IRQ_INDEX, count=3)
    assert buf[:8] == b"\xee" * 8 and buf[24:] == b"\xee" * 16
    assert uapi.vfio_irq_info.unpack(buf, 8) == (16, 0, 2, 3)


def test_nested_fields_are_dotted_and_tuple_names_use_underscores():
    layout = uapi.vfio_region_info_cap_type
    assert layout.fields == ("header.id", "header.version", "header.next", "type", "subtype")
    assert layout.tuple._fields == ("header_id", "header_version", "header_next", "type", "subtype")
    assert layout.pack(**{"header.id": 2}) == layout.pack(header_id=2)
    assert layout.offsetof("header.next") == 4


def test_reserved_names_lose_their_leading_underscores_in_the_tuple():
    assert uapi.vfio_iommu_spapr_tce_create.tuple._fields[3] == "resv1"
    assert uapi.vfio_iommu_spapr_tce_create.pack(__resv1=1) == uapi.vfio_iommu_spapr_tce_create.pack(resv1=1)


def test_flexible_arrays_have_an_offset_but_no_field_and_no_size():
    for layout, member in [(uapi.vfio_irq_set, "data"), (uapi.vfio_device_feature, "data"),
                           (uapi.vfio_pci_hot_reset_info, "devices"),
                           (uapi.vfio_region_info_cap_sparse_mmap, "areas"),
                           (uapi.vfio_iommu_type1_dma_unmap, "data")]:
        assert member not in layout.fields
        assert layout.offsets[member] == layout.size


def test_an_anonymous_union_packs_as_its_first_member():
    layout = uapi.vfio_device_gfx_plane_info
    assert layout.offsets["region_index"] == layout.offsets["dmabuf_id"]
    assert "region_index" in layout.fields and "dmabuf_id" not in layout.fields


def test_byte_arrays_and_packed_ccw_structs():
    io = uapi.ccw_io_region
    assert io.size == 124 and io.offsetof("ret_code") == 120
    unpacked = io.unpack(io.pack(orb_area=b"\x01" * 12, ret_code=5))
    assert unpacked.orb_area == b"\x01" * 12 and unpacked.scsw_area == bytes(12)


def test_pointers_pack_as_integers():
    bitmap = uapi.vfio_bitmap
    assert bitmap.unpack(bitmap.pack(pgsize=4096, size=8, data=0xDEAD000)).data == 0xDEAD000


def test_an_unknown_field_is_an_error():
    with pytest.raises(TypeError, match="no field 'indx'"):
        uapi.vfio_region_info.pack(indx=1)
    with pytest.raises(KeyError):
        uapi.vfio_region_info.offsetof("indx")
