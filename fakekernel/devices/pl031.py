"""ARM's PL031 real-time clock as QEMU models it (hw/rtc/pl031.c): the virt board's RTC.

The count (DR) is the host's wall clock in seconds plus an offset that a write to LR moves, all
32 bits wide. Writing MR or LR re-arms the match (pl031_set_alarm): QEMU takes MR minus the
count as an unsigned 32-bit number of seconds, so a match equal to the count raises the
interrupt at once, a match one second behind it is 2**32 - 1 seconds away, and a match N seconds
ahead fires N whole seconds after the write, which can be up to a second after DR reached it.
The interrupt stays raised (RIS) until a write to ICR clears it; the line is RIS & IMSC.
"""

from __future__ import annotations

import time

from ..virqfd import Timer
from .sysbus import PrimeCell

DR, MR, LR, CR, IMSC, RIS, MIS, ICR = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C
U32 = 0xFFFFFFFF
NS_PER_SECOND = 1_000_000_000


class PL031(PrimeCell):
    periphid = 0x00141031

    def __init__(self) -> None:
        super().__init__()
        # pl031_init sets the count to the wall-clock time; QEMU's rtc_clock is that clock.
        self.tick_offset = 0
        self.mr = self.lr = self.imsc = self.ris = 0
        self.timer: Timer | None = None

    def count(self) -> int:
        return (self.tick_offset + time.time_ns() // NS_PER_SECOND) & U32

    def _update(self) -> None:
        self.set_irq(0, bool(self.ris & self.imsc))

    def _interrupt(self) -> None:
        self.ris = 1
        self._update()

    def _set_alarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ticks = (self.mr - self.count()) & U32
        if ticks:
            self.timer = self.call_later(ticks, self._interrupt)
        else:
            self._interrupt()

    def register(self, offset: int) -> int:
        if offset == DR:
            return self.count()
        if offset == CR:
            return 1  # QEMU's RTC is always enabled
        if offset == MIS:
            return self.ris & self.imsc
        return {MR: self.mr, LR: self.lr, IMSC: self.imsc, RIS: self.ris}.get(offset, 0)

    def write(self, offset: int, value: int) -> None:
        if offset == LR:
            self.lr = value
            self.tick_offset = (self.tick_offset + value - self.count()) & U32
            self._set_alarm()
        elif offset == MR:
            self.mr = value
            self._set_alarm()
        elif offset == IMSC:
            self.imsc = value & 1
            self._update()
        elif offset == ICR:
            self.ris &= ~value
            self._update()
