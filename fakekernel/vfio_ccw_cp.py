"""vfio-ccw's channel program translation (drivers/s390/cio/vfio_ccw_cp.c, Linux 6.1).

cp_init copies the guest's CCWs into kernel memory, one chain per run of chained CCWs (at most
256, read 2 KiB at a time from the chain's IOVA) plus one per TIC target outside the chains so far;
format-0 CCWs become format 1 on the way. cp_prefetch pins every data area the CCWs address,
read-write, and gives each non-TIC CCW an IDAL in kernel memory (the IDA flag set, the data
address the IDAL's), and each TIC the kernel address of its target. cp_get_orb points the ORB at
the first chain. cp_update_scsw turns an ending address inside a chain back into the guest's
IOVA; once the program is freed nothing does, so the address a later halt or clear reports is
the kernel's own. Kernel addresses are 31-bit and 8-aligned, as GFP_DMA memory is.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW0, CCW1, ORB, SCSW

from .devices.ccw_subchannel import CCW_SIZE, DataStream

CCWCHAIN_LEN_MAX = 256
PAGE_SIZE = 4096
IDAW_SIZE = 8
# Where the fake's kernel keeps translated programs: each program its own 64 KiB, each chain of
# it (at most 2 KiB of CCWs) its own 4 KiB, so no chain's range touches another's.
_KERNEL_CCWS = 0x3E000000
_PROGRAM_SPAN, _CHAIN_SPAN = 0x10000, 0x1000
_programs = itertools.count()


def does_data_transfer(ccw: CCW1) -> bool:
    """ccw_does_data_transfer: the skip flag stops only a read, read backward or sense."""
    if not ccw.count or ccw.cmd_code == css.CCW_CMD_NOOP:
        return False
    if not ccw.flags & css.CCW_FLAG_SKIP:
        return True
    reads = ccw.cmd_code & 0x03 == 0x02 or ccw.cmd_code & 0x0F in (0x0C, css.CCW_CMD_BASIC_SENSE)
    return not reads


def to_format1(ccw: CCW0) -> CCW1:
    """convert_ccw0_to_ccw1: a format-0 TIC keeps only its address."""
    if ccw.cmd_code & 0x0F == css.CCW_CMD_TIC:
        return CCW1(css.CCW_CMD_TIC, 0, 0, ccw.cda0 << 16 | ccw.cda1)
    return ccw.to_ccw1()


@dataclass(slots=True)
class Chain:
    """One ccwchain: the guest's CCWs from `iova`, their kernel copy at `kaddr`, and for each the
    guest pages its data stream covers (the IDAL's pages, in order)."""

    iova: int
    kaddr: int
    ccws: list[CCW1]
    segments: list[list[tuple[int, int]]] = field(default_factory=list)

    def holds(self, addr: int, base: int, extra: int = 0) -> bool:
        """is_cpa_within_range: addr among the chain's CCWs from `base`, `extra` CCWs past them."""
        return base <= addr <= base + (len(self.ccws) - 1 + extra) * CCW_SIZE


class ChannelProgram:
    """struct channel_program: the chains of one start request, on one type1 IOMMU."""

    def __init__(self, iommu):
        self.iommu = iommu
        self.chains: list[Chain] = []
        self.orb = ORB()
        self.initialized = False
        self._base = _KERNEL_CCWS + next(_programs) % 256 * _PROGRAM_SPAN

    # -- cp_init ---------------------------------------------------------------------------------
    def init(self, orb: ORB) -> int:
        """0, or the -errno a copy of the guest's CCWs or an unsupported IDAL gave."""
        self.orb = ORB.unpack(orb.pack())
        ret = self._handle_ccw(orb.cpa)
        if ret:
            self.free()
            return ret
        self.initialized = True
        self.orb.ctrl0 |= css.ORB_CTRL0_MASK_C64
        return 0

    def _copy(self, iova: int, n: int) -> tuple[int, bytes]:
        """vfio_dma_rw from the guest: (-errno, b"") when the IOMMU has no readable mapping."""
        err = self.iommu.pin(iova, n, write=False)
        return (-err, b"") if err else (0, self.iommu.dma_read(iova, n))

    def _handle_ccw(self, cda: int) -> int:
        """ccwchain_handle_ccw: a chain from cda, then one for each TIC leading out of all chains."""
        ret, raw = self._copy(cda, CCWCHAIN_LEN_MAX * CCW_SIZE)
        if ret:
            return ret
        fmt1 = self.orb.ctrl0 & css.ORB_CTRL0_MASK_FMT
        guest = [CCW1.unpack(raw, i) if fmt1 else to_format1(CCW0.unpack(raw, i))
                 for i in range(0, len(raw), CCW_SIZE)]
        length = self._calc_length(cda, guest)
        if length < 0:
            return length
        chain = Chain(cda, self._base + len(self.chains) * _CHAIN_SPAN, guest[:length])
        self.chains.append(chain)
        for tic in chain.ccws:
            if tic.cmd_code == css.CCW_CMD_TIC and not any(c.holds(tic.cda, c.iova) for c in self.chains):
                ret = self._handle_ccw(tic.cda)
                if ret:
                    return ret
        return 0

    def _calc_length(self, iova: int, guest: list[CCW1]) -> int:
        """ccwchain_calc_length: chained CCWs, and TICs back into the chain, belong to it."""
        idal_ok = self.orb.ctrl0 & css.ORB_CTRL0_MASK_C64 and not self.orb.ctrl0 & css.ORB_CTRL0_MASK_I2K
        for count, ccw in enumerate(guest, 1):
            if ccw.flags & css.CCW_FLAG_IDA and not idal_ok:
                return -errno.EOPNOTSUPP
            back = ccw.cmd_code == css.CCW_CMD_TIC and iova <= ccw.cda <= iova + (count - 1) * CCW_SIZE
            if not ccw.flags & (css.CCW_FLAG_CC | css.CCW_FLAG_DC) and not back:
                return count
        return -errno.EINVAL

    # -- cp_prefetch -----------------------------------------------------------------------------
    def prefetch(self) -> int:
        """Every CCW translated: a TIC to its target's kernel copy, the rest to an IDAL of pinned
        guest pages."""
        for chain in self.chains:
            for i, ccw in enumerate(chain.ccws):
                ret = self._fetch_tic(chain, i) if ccw.cmd_code == css.CCW_CMD_TIC else self._fetch_ccw(chain, i)
                if ret:
                    return ret
        return 0

    def _fetch_tic(self, chain: Chain, i: int) -> int:
        tic = chain.ccws[i]
        target = next((c for c in self.chains if c.holds(tic.cda, c.iova)), None)
        if target is None:
            return -errno.EFAULT
        chain.ccws[i] = CCW1(tic.cmd_code, tic.flags, tic.count, target.kaddr + tic.cda - target.iova)
        chain.segments.append([])
        return 0

    def _fetch_ccw(self, chain: Chain, i: int) -> int:
        """The data area's pages, from a guest IDAL or contiguous from the data address, pinned
        read-write when the CCW moves data; the kernel's IDAL sits after the chain's CCWs."""
        ccw = chain.ccws[i]
        count = ccw.count or 1
        if ccw.flags & css.CCW_FLAG_IDA:
            ret, first = self._copy(ccw.cda, IDAW_SIZE)
            if ret:
                return ret
            start = int.from_bytes(first, "big")
            ret, idal = self._copy(ccw.cda, _idaws(start, count) * IDAW_SIZE)
            if ret:
                return ret
            pages = [int.from_bytes(idal[at:at + IDAW_SIZE], "big") for at in range(0, len(idal), IDAW_SIZE)]
        else:
            start = ccw.cda
            pages = [start] + [(start & ~(PAGE_SIZE - 1)) + n * PAGE_SIZE for n in range(1, _idaws(start, count))]
        segments = [(addr, PAGE_SIZE - addr % PAGE_SIZE) for addr in pages]
        if does_data_transfer(ccw):
            for addr in pages:
                err = self.iommu.pin(addr & ~(PAGE_SIZE - 1), PAGE_SIZE, write=True)
                if err:
                    return -err
        chain.segments.append(segments)
        idal = chain.kaddr + CCWCHAIN_LEN_MAX * CCW_SIZE + i * IDAW_SIZE
        chain.ccws[i] = CCW1(ccw.cmd_code, ccw.flags | css.CCW_FLAG_IDA, ccw.count, idal)
        return 0

    # -- what the subchannel runs on, and what it reports --------------------------------------
    def get_orb(self, intparm: int, lpm: int) -> ORB:
        """cp_get_orb: format 1, storage key 0, the subchannel's paths unless the guest chose."""
        ctrl0 = self.orb.ctrl0 & ~css.ORB_CTRL0_MASK_KEY | css.ORB_CTRL0_MASK_FMT
        return ORB(intparm, ctrl0, self.orb.lpm or lpm, self.orb.ctrl1, self.chains[0].kaddr)

    def _at(self, addr: int) -> tuple[Chain, int] | None:
        chain = next((c for c in self.chains if c.holds(addr, c.kaddr) and (addr - c.kaddr) % CCW_SIZE == 0), None)
        return None if chain is None else (chain, (addr - chain.kaddr) // CCW_SIZE)

    def fetch(self, addr: int) -> CCW1 | None:
        found = self._at(addr)
        return None if found is None else found[0].ccws[found[1]]

    def stream(self, addr: int, ccw: CCW1) -> DataStream:
        chain, i = self._at(addr)
        return DataStream(self.iommu, chain.segments[i], ccw)

    def update_scsw(self, scsw: SCSW) -> None:
        """cp_update_scsw: an address just past a chain's last CCW still counts as the chain's."""
        if not self.initialized:
            return
        chain = next((c for c in self.chains if c.holds(scsw.cpa, c.kaddr, extra=1)), None)
        if chain is not None:
            scsw.cpa = chain.iova + scsw.cpa - chain.kaddr

    def free(self) -> None:
        """cp_free: the pins go with the chains (the fake's pins hold nothing)."""
        self.initialized = False
        self.chains = []


def _idaws(start: int, count: int) -> int:
    """idal_nr_words: the 4 KiB blocks `count` bytes from `start` touch."""
    return (start % PAGE_SIZE + count + PAGE_SIZE - 1) // PAGE_SIZE
