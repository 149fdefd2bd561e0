"""ARM's PL061 GPIO controller as QEMU models it (hw/gpio/pl061.c, ARM's variant, not Luminary's):
the virt board's GPIO block, eight lines, one interrupt.

GPIODATA is addressed through its mask: bits [9:2] of the offset select which lines a read shows
and a write may change (only lines set as outputs in GPIODIR). Nothing on the board drives an input
line while a test runs (the power button's gpio-key pulses line 3 only on system_powerdown), so
inputs change only when a line's direction flips. An input change latches an edge interrupt; a
line sensed by level (GPIOIS) latches while its level matches GPIOIEV, again on every update, so
GPIOIC clears it only once the level no longer matches. The interrupt is GPIORIS & GPIOIE. The
outputs lead nowhere on the board, so they are not modelled.
"""

from __future__ import annotations

from .sysbus import PrimeCell

DATA_END = 0x400
DIR, IS, IBE, IEV, IE, RIS, MIS, IC, AFSEL = 0x400, 0x404, 0x408, 0x40C, 0x410, 0x414, 0x418, 0x41C, 0x420
LINES = 0xFF
# The registers that hold one bit per line, by offset, as QEMU names them in PL061State.
PER_LINE = {DIR: "dir", IS: "isense", IBE: "ibe", IEV: "iev", IE: "im", AFSEL: "afsel"}


class PL061(PrimeCell):
    periphid = 0x00041061

    def __init__(self) -> None:
        super().__init__()
        self.data = self.old_in_data = self.istate = 0
        self.dir = self.isense = self.ibe = self.iev = self.im = self.afsel = 0

    def _update(self) -> None:
        """pl061_update's inputs: latch edges on changed inputs and levels on sensed lines."""
        changed = (self.old_in_data ^ self.data) & ~self.dir & LINES
        if changed:
            self.old_in_data = self.data
            self.istate |= changed & ~self.isense & (self.ibe | ~(self.data ^ self.iev)) & LINES
        self.istate |= ~(self.data ^ self.iev) & self.isense & LINES
        self.set_irq(0, bool(self.istate & self.im))

    def register(self, offset: int) -> int:
        if offset < DATA_END:
            return self.data & offset >> 2
        if offset == RIS:
            return self.istate
        if offset == MIS:
            return self.istate & self.im
        name = PER_LINE.get(offset)
        return getattr(self, name) if name else 0

    def write(self, offset: int, value: int) -> None:
        if offset < DATA_END:
            mask = offset >> 2 & self.dir
            self.data = self.data & ~mask | value & mask
        elif offset == IC:
            self.istate &= ~value
        elif offset in PER_LINE:
            setattr(self, PER_LINE[offset], value & LINES)
        else:
            return
        self._update()
