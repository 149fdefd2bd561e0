"""QEMU's educational PCI device (hw/misc/edu.c), register for register.

QEMU computes the factorial in a thread and runs DMA off a 100 ms timer; a driver must poll
for both. Here both finish before the write returns, which is one legal interleaving.
"""

from __future__ import annotations

from ..pci import Bar, PciFunction

IDENTIFICATION = 0x010000ED
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
FACT_IRQ = 0x001
DMA_IRQ = 0x100
DMA_RUN = 0x1
DMA_DIR_TO_PCI = 0x2
DMA_IRQ_ENABLE = 0x4
DMA_START = 0x40000
DMA_SIZE = 4096
DMA_MASK = (1 << 28) - 1
ALL_ONES = 0xFFFFFFFFFFFFFFFF
# edu's MemoryRegionOps accept only 4- and 8-byte accesses; QEMU's memory core answers the
# others as unassigned memory: reads give 0 and writes are dropped, before edu sees them.
VALID_SIZES = (4, 8)

REG_ID, REG_LIVENESS, REG_FACT, REG_STATUS, REG_IRQ_STATUS = 0x00, 0x04, 0x08, 0x20, 0x24
REG_IRQ_RAISE, REG_IRQ_ACK = 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_CNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
# The registers that hold state, by offset; the others read as all ones.
STATE_REGS = {REG_LIVENESS: "liveness", REG_FACT: "fact", REG_STATUS: "status", REG_IRQ_STATUS: "irq_status",
              REG_DMA_SRC: "dma_src", REG_DMA_DST: "dma_dst", REG_DMA_CNT: "dma_cnt", REG_DMA_CMD: "dma_cmd"}


class Edu(PciFunction):
    vendor_id = 0x1234
    device_id = 0x11E8
    revision = 0x10
    class_code = 0x00FF00
    interrupt_pin = 1
    model = "edu"

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(0, Bar(1 << 20))
        self.add_msi(0x40, vectors_log2=0, is_64bit=True, maskbit=False)
        self.errors: list[str] = []
        self._power_on()

    def _power_on(self) -> None:
        self.liveness = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_cnt = self.dma_cmd = 0
        self.dma_buf = bytearray(DMA_SIZE)

    def reset(self) -> None:
        super().reset()
        self._power_on()

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if size not in VALID_SIZES:
            return 0
        mask = ALL_ONES >> (64 - 8 * size)
        if offset < 0x80 and size != 4:
            return mask
        if offset == REG_ID:
            return IDENTIFICATION & mask
        name = STATE_REGS.get(offset)
        return (getattr(self, name) if name else ALL_ONES) & mask

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if size not in VALID_SIZES or (offset < 0x80 and size != 4):
            return
        if offset == REG_LIVENESS:
            self.liveness = ~value & 0xFFFFFFFF
        elif offset == REG_FACT:
            if not self.status & STATUS_COMPUTING:
                self._factorial(value & 0xFFFFFFFF)
        elif offset == REG_STATUS:
            if value & STATUS_IRQFACT:
                self.status |= STATUS_IRQFACT
            else:
                self.status &= ~STATUS_IRQFACT
        elif offset == REG_IRQ_RAISE:
            self.raise_irq(value)
        elif offset == REG_IRQ_ACK:
            self.lower_irq(value)
        elif offset in (REG_DMA_SRC, REG_DMA_DST, REG_DMA_CNT, REG_DMA_CMD):
            if self.dma_cmd & DMA_RUN:
                return
            if offset == REG_DMA_CMD:
                if value & DMA_RUN:
                    self.dma_cmd = value
                    self._dma()
                return
            setattr(self, STATE_REGS[offset], value)

    def _factorial(self, n: int) -> None:
        result = 1
        for i in range(n, 0, -1):
            result = (result * i) & 0xFFFFFFFF
            if not result:
                break
        self.fact = result
        if self.status & STATUS_IRQFACT:
            self.raise_irq(FACT_IRQ)

    def raise_irq(self, value: int) -> None:
        self.irq_status |= value & 0xFFFFFFFF
        if self.irq_status:
            if self.msi_enabled():
                self.msi_notify(0)
            else:
                self.set_irq(True)

    def lower_irq(self, value: int) -> None:
        self.irq_status &= ~value & 0xFFFFFFFF
        if not self.irq_status and not self.msi_enabled():
            self.set_irq(False)

    def _in_buffer(self, addr: int, count: int) -> bool:
        end = addr + count
        if DMA_START <= addr < DMA_START + DMA_SIZE and addr < end <= DMA_START + DMA_SIZE:
            return True
        self.errors.append(f"EDU: DMA range {addr:#x}-{end - 1:#x} out of bounds "
                           f"({DMA_START:#x}-{DMA_START + DMA_SIZE - 1:#x})")
        return False

    def _dma(self) -> None:
        """QEMU aborts on a bad range; the fake records the error and drops the transfer. A read
        the IOMMU or a cleared bus master refuses still fills the buffer: QEMU's memory core
        answers it as unassigned memory, with zeros (the CI VM's edu does the same)."""
        count = self.dma_cnt
        if self.dma_cmd & DMA_DIR_TO_PCI:
            if self._in_buffer(self.dma_src, count):
                start = self.dma_src - DMA_START
                self.dma_write(self.dma_dst & DMA_MASK, bytes(self.dma_buf[start:start + count]))
        elif self._in_buffer(self.dma_dst, count):
            data = self.dma_read(self.dma_src & DMA_MASK, count)
            start = self.dma_dst - DMA_START
            self.dma_buf[start:start + count] = bytes(count) if data is None else data
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_ENABLE:
            self.raise_irq(DMA_IRQ)
