"""IRQ descriptors as a user sees them: /proc/interrupts (kernel/irq/proc.c's show_interrupts).

An IRQ is listed while a handler is requested on it, under the names its handlers were requested
with. vfio-pci requests one per vector it wires to an eventfd, named vfio-intx(BDF),
vfio-msi[N](BDF) and vfio-msix[N](BDF) (vfio_pci_intrs.c), which is how a user tells which vectors
the kernel has wired, on 6.1 and 6.12 alike. The fake counts no interrupts: its counts stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyfakefs.fake_filesystem import FakeFilesystem

PROC_INTERRUPTS = "/proc/interrupts"
# x86's IO-APIC pins keep their numbers; MSI vectors are given the numbers after them.
NR_LEGACY_IRQS = 24
PREC = 3  # show_interrupts' width of the IRQ number below 1000 IRQs


@dataclass(slots=True)
class IrqDesc:
    chip: str
    hwirq: int
    flow: str
    actions: list[str] = field(default_factory=list)


class Interrupts:
    """The kernel's IRQ numbers and the handlers requested on them, shown in /proc/interrupts."""

    def __init__(self, fs: FakeFilesystem):
        self.descs: dict[int, IrqDesc] = {}
        self.file = fs.create_file(PROC_INTERRUPTS)
        self._show()

    def alloc_msi(self, chip: str, hwirq: int) -> int:
        """An IRQ for one MSI or MSI-X vector (msi_domain_alloc_irqs): the lowest free number past
        the legacy pins, until `free_msi`."""
        irq = NR_LEGACY_IRQS
        while irq in self.descs:
            irq += 1
        self.descs[irq] = IrqDesc(chip, hwirq, "edge")
        return irq

    def free_msi(self, irq: int) -> None:
        del self.descs[irq]

    def request_irq(self, irq: int, name: str) -> None:
        """A legacy pin's descriptor exists from boot; an INTx handler may share it."""
        self.descs.setdefault(irq, IrqDesc("IR-IO-APIC", irq, "fasteoi")).actions.append(name)
        self._show()

    def free_irq(self, irq: int, name: str) -> None:
        self.descs[irq].actions.remove(name)
        self._show()

    def _show(self) -> None:
        lines = [f"{'':{PREC + 8}}CPU0"]
        for irq in sorted(self.descs):
            d = self.descs[irq]
            if d.actions:
                lines.append(f"{irq:{PREC}}: {0:10}  {d.chip:>8} {d.hwirq:{PREC}}-{d.flow:<8}  {', '.join(d.actions)}")
        self.file.set_contents("\n".join(lines) + "\n")
