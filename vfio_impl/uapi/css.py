"""The s390 channel-subsystem formats that travel inside the vfio-ccw regions.

<linux/vfio_ccw.h> only gives their sizes (orb_area, scsw_area, irb_area, schib_area, the CRW
word); what is inside is the architecture's (Principles of Operation), which QEMU spells in
hw/s390x/ioinst.h and Linux in asm/cio.h. The driver and the fake subchannel read and write the
same bytes, so the layouts and bit names live here once. Everything is big-endian, as on s390.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar

# -- SCSW: subchannel status word (command mode) -------------------------------------------------
SCSW_FLAGS_MASK_KEY = 0xF000
SCSW_FLAGS_MASK_SCTL = 0x0800
SCSW_FLAGS_MASK_ESWF = 0x0400
SCSW_FLAGS_MASK_CC = 0x0300
SCSW_FLAGS_MASK_FMT = 0x0080
SCSW_FLAGS_MASK_PFCH = 0x0040
SCSW_FLAGS_MASK_ISIC = 0x0020
SCSW_FLAGS_MASK_ALCC = 0x0010
SCSW_FLAGS_MASK_SSI = 0x0008
SCSW_FLAGS_MASK_ZCC = 0x0004
SCSW_FLAGS_MASK_ECTL = 0x0002
SCSW_FLAGS_MASK_PNO = 0x0001

SCSW_CTRL_MASK_FCTL = 0x7000
SCSW_CTRL_MASK_ACTL = 0x0FE0
SCSW_CTRL_MASK_STCTL = 0x001F

SCSW_FCTL_CLEAR_FUNC = 0x1000
SCSW_FCTL_HALT_FUNC = 0x2000
SCSW_FCTL_START_FUNC = 0x4000

SCSW_ACTL_SUSP = 0x0020
SCSW_ACTL_DEVICE_ACTIVE = 0x0040
SCSW_ACTL_SUBCH_ACTIVE = 0x0080
SCSW_ACTL_CLEAR_PEND = 0x0100
SCSW_ACTL_HALT_PEND = 0x0200
SCSW_ACTL_START_PEND = 0x0400
SCSW_ACTL_RESUME_PEND = 0x0800

SCSW_STCTL_STATUS_PEND = 0x0001
SCSW_STCTL_SECONDARY = 0x0002
SCSW_STCTL_PRIMARY = 0x0004
SCSW_STCTL_INTERMEDIATE = 0x0008
SCSW_STCTL_ALERT = 0x0010

SCSW_DSTAT_ATTENTION = 0x80
SCSW_DSTAT_STAT_MOD = 0x40
SCSW_DSTAT_CU_END = 0x20
SCSW_DSTAT_BUSY = 0x10
SCSW_DSTAT_CHANNEL_END = 0x08
SCSW_DSTAT_DEVICE_END = 0x04
SCSW_DSTAT_UNIT_CHECK = 0x02
SCSW_DSTAT_UNIT_EXCEP = 0x01

SCSW_CSTAT_PCI = 0x80
SCSW_CSTAT_INCORR_LEN = 0x40
SCSW_CSTAT_PROG_CHECK = 0x20
SCSW_CSTAT_PROT_CHECK = 0x10
SCSW_CSTAT_DATA_CHECK = 0x08
SCSW_CSTAT_CHN_CTRL_CHK = 0x04
SCSW_CSTAT_INTF_CTRL_CHK = 0x02
SCSW_CSTAT_CHAIN_CHECK = 0x01

# -- PMCW: path management control word ----------------------------------------------------------
PMCW_FLAGS_MASK_QF = 0x8000
PMCW_FLAGS_MASK_W = 0x4000
PMCW_FLAGS_MASK_ISC = 0x3800
PMCW_FLAGS_MASK_ENA = 0x0080
PMCW_FLAGS_MASK_LM = 0x0060
PMCW_FLAGS_MASK_MME = 0x0018
PMCW_FLAGS_MASK_MP = 0x0004
PMCW_FLAGS_MASK_TF = 0x0002
PMCW_FLAGS_MASK_DNV = 0x0001

PMCW_CHARS_MASK_ST = 0x00E00000
PMCW_CHARS_MASK_MBFC = 0x00000004
PMCW_CHARS_MASK_XMWME = 0x00000002
PMCW_CHARS_MASK_CSENSE = 0x00000001

# -- ORB: operation request block (command mode) ------------------------------------------------
ORB_CTRL0_MASK_KEY = 0xF000
ORB_CTRL0_MASK_SPND = 0x0800
ORB_CTRL0_MASK_STR = 0x0400
ORB_CTRL0_MASK_MOD = 0x0200
ORB_CTRL0_MASK_SYNC = 0x0100
ORB_CTRL0_MASK_FMT = 0x0080
ORB_CTRL0_MASK_PFCH = 0x0040
ORB_CTRL0_MASK_ISIC = 0x0020
ORB_CTRL0_MASK_ALCC = 0x0010
ORB_CTRL0_MASK_SSIC = 0x0008
# Zero in a command-mode ORB; Linux's union orb reads it as the transport-mode bit (tm.b).
ORB_CTRL0_MASK_INVALID = 0x0004
ORB_CTRL0_MASK_C64 = 0x0002
ORB_CTRL0_MASK_I2K = 0x0001

ORB_CTRL1_MASK_ILS = 0x80
ORB_CTRL1_MASK_MIDAW = 0x40
ORB_CTRL1_MASK_ORBX = 0x01

# -- CCW: channel command word ------------------------------------------------------------------
CCW_FLAG_DC = 0x80
CCW_FLAG_CC = 0x40
CCW_FLAG_SLI = 0x20
CCW_FLAG_SKIP = 0x10
CCW_FLAG_PCI = 0x08
CCW_FLAG_IDA = 0x04
CCW_FLAG_SUSPEND = 0x02
CCW_FLAG_MIDA = 0x01

# The architecture's basic commands: the low bits 01 write, 10 read.
CCW_CMD_WRITE = 0x01
CCW_CMD_READ = 0x02
CCW_CMD_NOOP = 0x03
CCW_CMD_BASIC_SENSE = 0x04
CCW_CMD_TIC = 0x08
CCW_CMD_SENSE_ID = 0xE4

# The commands of virtio's channel I/O transport (the virtio spec, "Virtio Over Channel I/O"):
# the control unit type a virtio-ccw device's SENSE ID names, with the virtio device id as its
# model, and the data-in commands that read its features and configuration.
VIRTIO_CCW_CU_TYPE = 0x3832
VIRTIO_ID_BLOCK = 2
CCW_CMD_READ_FEAT = 0x12
CCW_CMD_READ_CONF = 0x22

# -- ESW: extended status word (format 0) -------------------------------------------------------
# The ERW's concurrent-sense bit: the ECW holds sense data.
ERW_CONS = 0x01000000

# -- CRW: channel report word -------------------------------------------------------------------
CRW_FLAGS_MASK_S = 0x4000
CRW_FLAGS_MASK_R = 0x2000
CRW_FLAGS_MASK_C = 0x1000
CRW_FLAGS_MASK_RSC = 0x0F00
CRW_FLAGS_MASK_A = 0x0080
CRW_FLAGS_MASK_ERC = 0x003F

CRW_ERC_EVENT = 0x00
CRW_ERC_INIT = 0x02
CRW_ERC_IPI = 0x04
CRW_ERC_PERRN = 0x06

CRW_RSC_SUBCH = 0x3
CRW_RSC_CHP = 0x4
CRW_RSC_CSS = 0xB

SENSE_DATA_SIZE = 32
# SENSE ID stores up to 256 bytes (SA22-7204): 0xFF, the control unit's and the device's type and
# model, then command information words.
SENSE_ID_SIZE = 256


class _Format:
    """Packed in field order by one big-endian Struct; formats that nest others override both."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, buf, offset: int = 0):
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(slots=True)
class SCSW(_Format):
    flags: int = 0
    ctrl: int = 0
    cpa: int = 0
    dstat: int = 0
    cstat: int = 0
    count: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">HHIBBH")

    @property
    def cc(self) -> int:
        """The deferred condition code."""
        return (self.flags & SCSW_FLAGS_MASK_CC) >> 8


@dataclass(slots=True)
class PMCW(_Format):
    intparm: int = 0
    flags: int = 0
    devno: int = 0
    lpm: int = 0
    pnom: int = 0
    lpum: int = 0
    pim: int = 0
    mbi: int = 0
    pom: int = 0
    pam: int = 0
    chpid: bytes = bytes(8)
    chars: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">IHHBBBBHBB8sI")

    @property
    def isc(self) -> int:
        return (self.flags & PMCW_FLAGS_MASK_ISC) >> 11


@dataclass(slots=True)
class SCHIB:
    """Subchannel-information block: what store subchannel gives and modify subchannel takes."""

    pmcw: PMCW = field(default_factory=PMCW)
    scsw: SCSW = field(default_factory=SCSW)
    mba: int = 0
    mda: bytes = bytes(4)

    _TAIL: ClassVar[struct.Struct] = struct.Struct(">Q4s")
    SIZE: ClassVar[int] = PMCW.STRUCT.size + SCSW.STRUCT.size + _TAIL.size

    def pack(self) -> bytes:
        return self.pmcw.pack() + self.scsw.pack() + self._TAIL.pack(self.mba, self.mda)

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "SCHIB":
        pmcw = PMCW.unpack(buf, offset)
        scsw = SCSW.unpack(buf, offset + PMCW.STRUCT.size)
        mba, mda = cls._TAIL.unpack_from(buf, offset + PMCW.STRUCT.size + SCSW.STRUCT.size)
        return cls(pmcw, scsw, mba, mda)


@dataclass(slots=True)
class IRB:
    """Interruption-response block: the SCSW, the extended status word, and the extended
    control word, which holds the sense data after a unit check with concurrent sense."""

    scsw: SCSW = field(default_factory=SCSW)
    esw: tuple[int, ...] = (0,) * 5
    ecw: bytes = bytes(SENSE_DATA_SIZE)
    emw: bytes = bytes(32)

    _TAIL: ClassVar[struct.Struct] = struct.Struct(">5I32s32s")
    SIZE: ClassVar[int] = SCSW.STRUCT.size + _TAIL.size

    def pack(self) -> bytes:
        return self.scsw.pack() + self._TAIL.pack(*self.esw, self.ecw, self.emw)

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "IRB":
        scsw = SCSW.unpack(buf, offset)
        *esw, ecw, emw = cls._TAIL.unpack_from(buf, offset + SCSW.STRUCT.size)
        return cls(scsw, tuple(esw), ecw, emw)


@dataclass(slots=True)
class ORB(_Format):
    intparm: int = 0
    ctrl0: int = 0
    lpm: int = 0
    ctrl1: int = 0
    cpa: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">IHBBI")


@dataclass(slots=True)
class CCW1(_Format):
    """A format-1 CCW: a 31-bit data address."""

    cmd_code: int = 0
    flags: int = 0
    count: int = 0
    cda: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">BBHI")


@dataclass(slots=True)
class CCW0(_Format):
    """A format-0 CCW: a 24-bit data address split over two fields."""

    cmd_code: int = 0
    cda0: int = 0
    cda1: int = 0
    flags: int = 0
    reserved: int = 0
    count: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">BBHBBH")

    def to_ccw1(self) -> CCW1:
        return CCW1(self.cmd_code, self.flags, self.count, self.cda0 << 16 | self.cda1)


@dataclass(slots=True)
class SenseID(_Format):
    """The first 8 bytes SENSE ID stores; `reserved` is 0xFF when the device said enough."""

    reserved: int = 0xFF
    cu_type: int = 0
    cu_model: int = 0
    dev_type: int = 0
    dev_model: int = 0
    unused: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">BHBHBB")


@dataclass(slots=True)
class CRW(_Format):
    flags: int = 0
    rsid: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">HH")

    @classmethod
    def build(cls, rsc: int, erc: int, rsid: int, solicited: bool = False, chained: bool = False) -> "CRW":
        flags = rsc << 8 & CRW_FLAGS_MASK_RSC | erc & CRW_FLAGS_MASK_ERC
        flags |= (CRW_FLAGS_MASK_S if solicited else 0) | (CRW_FLAGS_MASK_C if chained else 0)
        return cls(flags, rsid)

    @property
    def rsc(self) -> int:
        return (self.flags & CRW_FLAGS_MASK_RSC) >> 8

    @property
    def erc(self) -> int:
        return self.flags & CRW_FLAGS_MASK_ERC
