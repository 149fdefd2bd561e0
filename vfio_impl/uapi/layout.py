"""Byte layouts of VFIO structs, taken from cffi once and then packed with `struct`.

cffi knows C layout rules (padding, packing, pointer width) but is slow per
call; ``struct.Struct`` is fast but knows nothing of C.  A ``Layout`` asks cffi
at import and leaves only ``struct`` on the per-ioctl path.
"""

import functools
import struct
from collections import namedtuple

from vfio_impl.uapi._cdef import ffi

__all__ = ["Layout"]

_SCALARS = {
    "uint8_t": "B",
    "uint16_t": "H",
    "uint32_t": "I",
    "uint64_t": "Q",
    "int8_t": "b",
    "int16_t": "h",
    "int32_t": "i",
    "int64_t": "q",
}
_POINTER = {4: "I", 8: "Q"}[ffi.sizeof("void *")]


def _flatten(ctype, base: int, prefix: str):
    """Yield (dotted name, offset, struct format) for each packable member.

    Flexible arrays take no room in the struct, and the later members of an
    anonymous union overlap the first, so neither becomes a packed field.
    """
    end = base
    for name, field in ctype.fields:
        offset = base + field.offset
        ftype = field.type
        if offset < end:
            continue
        if ftype.kind == "array" and ftype.length is None:
            continue
        if ftype.kind in ("struct", "union"):
            yield from _flatten(ftype, offset, f"{prefix}{name}.")
        elif ftype.kind == "array" and ftype.item.cname == "uint8_t":
            yield f"{prefix}{name}", offset, f"{ftype.length}s"
        elif ftype.kind == "pointer":
            yield f"{prefix}{name}", offset, _POINTER
        elif ftype.kind == "primitive" and ftype.cname in _SCALARS:
            yield f"{prefix}{name}", offset, _SCALARS[ftype.cname]
        else:
            raise TypeError(f"struct {ctype.cname}: no packing for member {name} ({ftype.cname})")
        end = offset + ffi.sizeof(ftype)


def _all_offsets(ctype, base: int, prefix: str) -> dict[str, int]:
    offsets = {}
    for name, field in ctype.fields:
        offsets[prefix + name] = base + field.offset
        if field.type.kind in ("struct", "union"):
            offsets |= _all_offsets(field.type, base + field.offset, f"{prefix}{name}.")
    return offsets


def _tuple_name(field: str) -> str:
    # namedtuple refuses leading underscores (vfio's __pad, __resv1, ...).
    return field.replace(".", "_").lstrip("_")


class Layout:
    """One C struct: its size, member offsets and a native-order packer.

    Fields are the packable members in order; nested structs are flattened as
    ``"header.id"`` and appear in ``.tuple`` as ``header_id``.  Flexible array
    members are not fields but keep an offset, since that is where the
    variable part of the ioctl argument starts.
    """

    __slots__ = (
        "name", "size", "fields", "offsets", "struct", "tuple",
        "_offsetof", "_index", "_defaults", "_unpack_from", "_make",
    )

    def __init__(self, name: str) -> None:
        ctype = ffi.typeof(f"struct {name}")
        members = list(_flatten(ctype, 0, ""))
        self.name = name
        self.size: int = ffi.sizeof(ctype)
        self.fields: tuple[str, ...] = tuple(field for field, _, _ in members)
        self.offsets: dict[str, int] = {member: f.offset for member, f in ctype.fields}
        self._offsetof = _all_offsets(ctype, 0, "")

        fmt, pos = ["="], 0
        for _, offset, code in members:
            if offset > pos:
                fmt.append(f"{offset - pos}x")
            fmt.append(code)
            pos = offset + struct.calcsize("=" + code)
        if self.size > pos:
            fmt.append(f"{self.size - pos}x")
        self.struct = struct.Struct("".join(fmt))

        names = [_tuple_name(field) for field in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"struct {name}: field names collide as tuple names: {names}")
        self.tuple = namedtuple(name, names)
        self._index = {field: i for i, field in enumerate(self.fields)}
        self._index |= {tname: i for i, tname in enumerate(names)}
        self._defaults = [b"" if code.endswith("s") else 0 for _, _, code in members]
        if "argsz" in self._index:
            self._defaults[self._index["argsz"]] = self.size
        self._unpack_from = self.struct.unpack_from
        # namedtuple._make is a Python function that checks the length; struct gives one value
        # per field, so the tuple is built straight.
        self._make = functools.partial(tuple.__new__, self.tuple)

    def offsetof(self, member: str) -> int:
        """Offset of a member; dotted names reach into nested structs."""
        try:
            return self._offsetof[member]
        except KeyError:
            raise KeyError(f"struct {self.name} has no member {member!r}") from None

    def _values(self, fields: dict) -> list:
        values = self._defaults.copy()
        for field, value in fields.items():
            try:
                values[self._index[field]] = value
            except KeyError:
                raise TypeError(f"struct {self.name} has no field {field!r}") from None
        return values

    def pack(self, **fields) -> bytearray:
        """Missing fields are zero; a missing argsz is the fixed struct size."""
        buf = bytearray(self.size)
        self.struct.pack_into(buf, 0, *self._values(fields))
        return buf

    def pack_into(self, buf, at: int = 0, /, **fields) -> None:
        """`at` is positional-only: vfio_region_info has a field named offset."""
        self.struct.pack_into(buf, at, *self._values(fields))

    def unpack(self, buf, at: int = 0, /):
        return self._make(self._unpack_from(buf, at))

    def __repr__(self) -> str:
        return f"<Layout struct {self.name} size={self.size} fields={self.fields}>"
