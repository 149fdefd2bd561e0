"""Figure 1: an interrupt from an emulated device to the user's eventfd wait, against the same
hand-off done with bare eventfds.

Both sides are a ping-pong with a user process: the device side kicks, the user's blocking
eventfd read returns and it answers on a second eventfd. Only the kick differs: a raw
eventfd write, or edu raising its MSI inside the fake kernel (vfio-pci's trigger context
signals the eventfd the user handed to SET_IRQS).
"""

from __future__ import annotations

import functools
import os

from vfio_impl import uapi

from .fake import EDU, attached, bus_master
from .harness import Figure, Target, compare, loop, one_cpu
from .scale import Scale

EDU_IRQ = 0x1
STOP = 1 << 32


class Responder:
    """The user: a forked process blocked reading its eventfd, answering each wake-up on another.

    A process rather than a thread, so the hand-off is the kernel's wake-up alone: two threads
    of one interpreter also trade the GIL, which made the same ping-pong vary 5-11 us here."""

    def __init__(self, wait_fd: int):
        self.wait_fd = wait_fd
        self.answer = os.eventfd(0, os.EFD_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                while os.eventfd_read(wait_fd) < STOP:
                    os.eventfd_write(self.answer, 1)
            finally:
                os._exit(0)

    def round_trips(self, kick):
        """A side of the comparison: n kicks, each waiting for the user's answer."""
        return loop("kick(); eventfd_read(answer)", kick=kick, eventfd_read=os.eventfd_read, answer=self.answer)

    def close(self) -> None:
        os.eventfd_write(self.wait_fd, STOP)
        os.waitpid(self.pid, 0)
        os.close(self.answer)


def figure_1(scale: Scale) -> list[Figure]:
    """On one CPU (the target's figure), and with the user on another CPU where there is one."""
    allowed = os.sched_getaffinity(0)
    with one_cpu() as cpu:
        others = sorted(allowed - {cpu})
        placements = [("1", None)] + ([("1s", others[0])] if others else [])
        return [_figure_1(scale, number, user_cpu) for number, user_cpu in placements]


def _figure_1(scale: Scale, number: str, user_cpu: int | None) -> Figure:
    raw_fd = os.eventfd(0, os.EFD_CLOEXEC)
    user_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with attached(EDU) as (kernel, device):
            bus_master(device)
            device.set_irq_signaling(uapi.VFIO_PCI_MSI_IRQ_INDEX, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, user_fd)
            edu = kernel.functions[EDU]
            raw, fake = Responder(raw_fd), Responder(user_fd)
            if user_cpu is not None:
                for responder in (raw, fake):
                    os.sched_setaffinity(responder.pid, {user_cpu})
            try:
                samples = compare(fake.round_trips(functools.partial(kernel.locked, edu.raise_irq, EDU_IRQ)),
                                  raw.round_trips(functools.partial(os.eventfd_write, raw_fd, 1)),
                                  scale.pings, scale.ping_repeats)
            finally:
                raw.close()
                fake.close()
            device.disable_irq(uapi.VFIO_PCI_MSI_IRQ_INDEX)
    finally:
        os.close(raw_fd)
        os.close(user_fd)
    if user_cpu is None:
        return Figure("1", "fake IRQ delivery (edu MSI -> user's eventfd wait)",
                      "edu raising MSI in the fake, the user's blocking eventfd read returning and answering",
                      "raw eventfd ping-pong with the same user process", samples, Target("<=", 1.5),
                      note="both processes on one CPU")
    return Figure("1s", "the same with the user on another CPU", "as 1, the user process on its own CPU",
                  "the raw ping-pong, placed the same", samples, note="a wake-up across CPUs each way")
