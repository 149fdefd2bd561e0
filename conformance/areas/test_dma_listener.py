"""The container's memory listener: guest RAM the machine adds is mapped for DMA at its guest
physical address, read-only where the RAM is, whole pages only, and unmapped when it goes.
edu's DMA engine through the IOMMU is the witness on both backends."""

import errno
import mmap
import os

import pytest

from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY

from ..raw import wait_for

pytestmark = pytest.mark.vfio(device="edu", destructive=True)
PAGE = mmap.PAGESIZE
SRC, DST, CNT, CMD = 0x80, 0x88, 0x90, 0x98
RUN, TO_RAM = 0x1, 0x2
BUFFER = 0x40000
RAM, ROM = 0x200000, 0x300000
PATTERN = bytes(range(256)) * 2


@pytest.fixture
def edu(vfio_pci):
    return realize(vfio_pci)


def realize(vfio_pci):
    dev = vfio_pci(x_kvm_intx=False)
    dev.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
    return dev


def dma(dev, src: int, dst: int, count: int, to_ram: bool) -> None:
    """One edu transfer; real edu runs it off a 100 ms timer, so the run bit is polled."""
    for reg, value in ((SRC, src), (DST, dst), (CNT, count), (CMD, RUN | (TO_RAM if to_ram else 0))):
        dev.bar_write(0, reg, value, 4)
    assert wait_for(lambda: not dev.bar_read(0, CMD, 4) & RUN), "edu's DMA never finished"


def load(dev, gpa: int) -> None:
    """Guest RAM at gpa into edu's buffer."""
    dma(dev, gpa, BUFFER, len(PATTERN), to_ram=False)


def store(dev, gpa: int) -> None:
    """edu's buffer out to guest RAM at gpa."""
    dma(dev, BUFFER, gpa, len(PATTERN), to_ram=True)


def round_trip(dev, ram) -> bool:
    """The pattern from ram's first page through edu's buffer into its second."""
    ram.memory[0:len(PATTERN)] = PATTERN
    load(dev, ram.gpa)
    store(dev, ram.gpa + PAGE)
    return ram.memory[PAGE:PAGE + len(PATTERN)] == PATTERN


def errors(recorder: TraceRecorder) -> list[str]:
    return [f["message"] for f in recorder.named("error")]


def mappings(dev) -> dict:
    return dev.vbasedev.group.container.mappings


def test_guest_ram_is_mapped_at_its_guest_physical_address(edu):
    ram = edu.machine.add_ram(RAM, 4 * PAGE)
    assert mappings(edu) == {RAM: 4 * PAGE}
    assert round_trip(edu, ram)


def test_a_new_container_is_given_the_ram_already_there(vfio_pci):
    """Registering the listener replays the machine's RAM, as memory_listener_register does."""
    first = realize(vfio_pci)
    ram = first.machine.add_ram(RAM, 2 * PAGE)
    first.exit()
    dev = realize(vfio_pci)
    assert mappings(dev) == {RAM: 2 * PAGE}
    assert round_trip(dev, ram)


def test_read_only_ram_is_mapped_read_only(edu):
    rom = edu.machine.add_ram(ROM, PAGE, readonly=True)
    ram = edu.machine.add_ram(RAM, PAGE)
    rom.memory[0:len(PATTERN)] = PATTERN
    load(edu, ROM)
    store(edu, RAM)
    assert ram.memory[0:len(PATTERN)] == PATTERN, "the device could not read read-only RAM"
    rom.memory[0:len(PATTERN)] = bytes(len(PATTERN))
    store(edu, ROM)
    assert rom.memory[0:len(PATTERN)] == bytes(len(PATTERN)), "the device wrote read-only RAM"


def test_an_unaligned_section_is_reported_and_the_next_container_still_starts(vfio_pci):
    """The seed's listener reports the section and goes on; the section stays guest RAM, so a
    container set up later replays it, skips it again, and maps the rest."""
    first = realize(vfio_pci)
    with TraceRecorder() as tr:
        first.machine.add_ram(RAM + PAGE // 2, PAGE)
    assert errors(tr) == ["vfio_listener_region_add received unaligned region"]
    assert mappings(first) == {}
    first.exit()
    ram = first.machine.add_ram(ROM, 2 * PAGE)
    with TraceRecorder() as tr:
        dev = realize(vfio_pci)
    assert errors(tr) == ["vfio_listener_region_add received unaligned region"]
    assert mappings(dev) == {ROM: 2 * PAGE}
    assert round_trip(dev, ram)


def test_only_the_whole_pages_of_a_section_are_mapped(edu):
    ram = edu.machine.add_ram(RAM, PAGE + PAGE // 2)
    assert mappings(edu) == {RAM: PAGE}
    assert not round_trip(edu, ram), "DMA reached the unmapped tail page"
    assert ram.memory[PAGE:PAGE + len(PATTERN)] == bytes(len(PATTERN))


def test_removed_ram_is_unmapped(edu):
    ram = edu.machine.add_ram(RAM, PAGE)
    gone = edu.machine.add_ram(ROM, PAGE)
    ram.memory[0:len(PATTERN)] = PATTERN
    load(edu, RAM)
    edu.machine.remove_ram(gone)
    assert mappings(edu) == {RAM: PAGE}
    store(edu, ROM)
    assert gone.memory[0:len(PATTERN)] == bytes(len(PATTERN)), "DMA reached RAM the machine removed"
    store(edu, RAM + PAGE // 2)
    assert ram.memory[PAGE // 2:PAGE // 2 + len(PATTERN)] == PATTERN, "the DMA engine itself failed"


def test_a_device_reading_removed_ram_gets_zeros(edu):
    """The IOMMU refuses the read and QEMU's memory core answers a refused read with zeros,
    which edu copies into its buffer like any data."""
    ram = edu.machine.add_ram(RAM, 2 * PAGE)
    gone = edu.machine.add_ram(ROM, PAGE)
    gone.memory[0:len(PATTERN)] = PATTERN
    edu.machine.remove_ram(gone)
    assert round_trip(edu, ram)
    load(edu, ROM)
    store(edu, RAM + PAGE)
    assert ram.memory[PAGE:PAGE + len(PATTERN)] == bytes(len(PATTERN))


def test_an_overlapping_section_is_reported_without_touching_the_first(edu):
    """The kernel answers EEXIST, which is not the EBUSY the listener retries after an unmap;
    the listener reports it, as the seed's does, and the machine goes on."""
    ram = edu.machine.add_ram(RAM, 2 * PAGE)
    with TraceRecorder() as tr:
        edu.machine.add_ram(RAM + PAGE, 2 * PAGE)
    [message] = errors(tr)
    assert message.startswith(f"vfio_dma_map({RAM + PAGE:#x}, {2 * PAGE:#x}, ")
    assert message.endswith(f" = {-errno.EEXIST} ({os.strerror(errno.EEXIST)})")
    assert mappings(edu) == {RAM: 2 * PAGE}
    assert round_trip(edu, ram), "the first section lost its mapping"
