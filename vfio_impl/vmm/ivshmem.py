"""ivshmem: QEMU's inter-VM shared memory PCI device, as seed 004 (hw/misc/ivshmem.c) builds it,
on a Machine.

BAR0 holds four registers, BAR2 the shared memory: a POSIX shm object (`shm=`), or what an
ivshmem server sends (`chardev=`, the server's unix socket). With a server the device learns its
id, the memory and every peer's eventfds from the Machine's loop, as the messages come (the seed
reads them asynchronously; current QEMU reads the setup first), and with `msi` each of its own
eventfds is an MSI-X vector in the exclusive BAR1. The protocol's rules are uapi.ivshmem's
PeerProtocol; this file acts on its events. ivshmem is the VMM's own device, not a VFIO user, so
its socket, shm object and eventfds are the process's own fds, not a Host's.
"""

from __future__ import annotations

import _posixshmem
import errno
import functools
import mmap
import os
import re
import socket
import stat
import struct
from contextlib import ExitStack

from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import error_report, trace, tracing
from vfio_impl.hw.pci import MSIXDevice, default_write_config, msix_layout_valid, register_bar
from vfio_impl.ivshmem import protocol
from vfio_impl.uapi.pci_regs import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_CACHE_LINE_SIZE,
    PCI_CAP_ID_MSIX,
    PCI_CAP_MSIX_SIZEOF,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)
from vfio_impl.vmm.machine import Machine

PCI_VENDOR_ID_IVSHMEM = 0x1AF4  # PCI_VENDOR_ID_REDHAT_QUMRANET
PCI_DEVICE_ID_IVSHMEM = 0x1110
PCI_CLASS_MEMORY_RAM = 0x0500
PCI_SUBDEVICE_ID_QEMU = 0x1100
PCI_CONFIG_HEADER_SIZE = 0x40

IVSHMEM_REG_BAR_SIZE = 0x100
INTRMASK, INTRSTATUS, IVPOSITION, DOORBELL = 0, 4, 8, 12
IVSHMEM_PEER, IVSHMEM_MASTER = "peer", "master"
DEFAULT_SIZE = 4 << 20
MIGRATION_BLOCKER = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"

# msix_init_exclusive_bar: a 4 KiB BAR1 with the table in its lower half and the PBA above it.
MSIX_EXCLUSIVE_BAR_SIZE = 4096
MSIX_EXCLUSIVE_BAR_PBA_OFFSET = MSIX_EXCLUSIVE_BAR_SIZE // 2

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
_ACCESS_MASKS = {1: 0xFF, 2: 0xFFFF, 4: U32}
# What strtoull(s, &end, 10) converts: leading space, a sign, then digits.
_STRTOULL = re.compile(r"\s*([+-]?)(\d+)")
_SUFFIX_SHIFT = {"": 20, "M": 20, "m": 20, "G": 30, "g": 30}
VMSTATE_CONFIG = struct.Struct(">II")  # intrstatus, intrmask, as qemu_put_be32 writes them


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def ivshmem_get_size(sizearg: str) -> int:
    """strtoull in base 10 and the first character after the number: nothing or M means MiB,
    G means GiB (so "4MB" is 4 MiB); the result wraps at 64 bits as the C does."""
    m = _STRTOULL.match(sizearg)
    value, rest = 0, sizearg
    if m:
        sign, digits = m.groups()
        value = min(int(digits), U64)
        value = (-value) & U64 if sign == "-" else value
        rest = sizearg[m.end():]
    shift = _SUFFIX_SHIFT.get(rest[:1])
    if shift is None:
        raise VFIOError(f"invalid ram size: {sizearg}")
    value = (value << shift) & U64
    if not value or value & (value - 1):
        raise VFIOError("size must be power of 2")
    return value


class IVShmemState(MSIXDevice):
    """A realized ivshmem device: its config space, three BARs, registers and server state."""

    def __init__(self, machine: Machine, name: str, *, chardev: str | None, vectors: int, ioeventfd: bool,
                 msi: bool, shmobj: str | None, role: str | None, use64: int, irq_line: str | None):
        self.machine = machine
        self.name = name
        self.chardev = chardev
        self.vectors = vectors
        self.ioeventfd = ioeventfd
        self.msi = msi
        self.shmobj = shmobj
        self.role = role
        self.ivshmem_64bit = use64
        self.irq_route = irq_line or f"{name} INTA"
        self.ivshmem_size = DEFAULT_SIZE
        self.config = bytearray(PCI_CFG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CFG_SPACE_SIZE)
        self.bar_sizes = [0] * 6
        self.intrmask = 0
        self.intrstatus = 0
        self.irq_level = False
        self.irq = machine.irq_line(self.irq_route)
        self.vm_id = 0
        self.shm_fd = -1
        self.shm: mmap.mmap | None = None
        self.server: socket.socket | None = None
        self.peer: protocol.PeerProtocol | None = None
        self.incoming = protocol.Reassembler()
        self.own_eventfds: list[int] = []
        # memory_region_add_eventfd on DOORBELL: the 4-byte value written -> the eventfd it signals.
        self.ioeventfds: dict[int, int] = {}
        self.migration_blocker: str | None = None

    # -- realize / exit -----------------------------------------------------------------------
    @classmethod
    def realize(cls, machine: Machine, *, chardev: str | None = None, size: str | None = None, vectors: int = 1,
                ioeventfd: bool = False, msi: bool = True, shm: str | None = None, role: str | None = None,
                use64: int = 1, name: str = "ivshmem", irq_line: str | None = None) -> "IVShmemState":
        """pci_ivshmem_realize, with every step undone in reverse if a later one fails."""
        self = cls(machine, name, chardev=chardev, vectors=vectors, ioeventfd=ioeventfd, msi=msi, shmobj=shm,
                   role=role, use64=use64, irq_line=irq_line)
        if size is not None:
            self.ivshmem_size = ivshmem_get_size(size)
        if ioeventfd and not msi:
            raise VFIOError("ioeventfd/irqfd requires MSI")
        if role not in (None, IVSHMEM_PEER, IVSHMEM_MASTER):
            raise VFIOError("'role' must be 'peer' or 'master'")
        with ExitStack() as unwind:
            machine.migration.register_savevm("ivshmem", 0, self.save, self.load, self)
            unwind.callback(machine.migration.unregister_savevm, self)
            if role == IVSHMEM_PEER:
                self.migration_blocker = MIGRATION_BLOCKER
                machine.migration.migrate_add_blocker(self.migration_blocker)
                unwind.callback(self._del_migration_blocker)
            self._init_config()
            attr = PCI_BASE_ADDRESS_MEM_PREFETCH | (PCI_BASE_ADDRESS_MEM_TYPE_64 if use64 else 0)
            if chardev is not None:
                self._setup_server(unwind, attr)
            else:
                self._setup_shm(unwind, attr)
            unwind.pop_all()
        trace("ivshmem_realize", name=name, size=self.ivshmem_size, server=chardev is not None)
        return self

    def _init_config(self) -> None:
        """The PCI core's header with ivshmem's ids, COMMAND io+memory, pin A, and BAR0."""
        c = self.config
        struct.pack_into("<HH", c, PCI_VENDOR_ID, PCI_VENDOR_ID_IVSHMEM, PCI_DEVICE_ID_IVSHMEM)
        struct.pack_into("<H", c, PCI_CLASS_PROG + 1, PCI_CLASS_MEMORY_RAM)
        struct.pack_into("<HH", c, PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID_IVSHMEM, PCI_SUBDEVICE_ID_QEMU)
        struct.pack_into("<H", c, PCI_COMMAND, PCI_COMMAND_IO | PCI_COMMAND_MEMORY)
        c[PCI_INTERRUPT_PIN] = 1
        struct.pack_into("<H", self.wmask, PCI_COMMAND,
                         PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
        for off in (PCI_CACHE_LINE_SIZE, PCI_INTERRUPT_LINE):
            self.wmask[off] = 0xFF
        self.wmask[PCI_CONFIG_HEADER_SIZE:] = b"\xff" * (PCI_CFG_SPACE_SIZE - PCI_CONFIG_HEADER_SIZE)
        self._register_bar(0, IVSHMEM_REG_BAR_SIZE, 0)

    def _register_bar(self, nr: int, size: int, attr: int) -> None:
        self.bar_sizes[nr] = size
        register_bar(self.config, self.wmask, nr, size, attr)

    def _setup_server(self, unwind: ExitStack, attr: int) -> None:
        """The server path: connect, MSI-X in BAR1, room for 16 peers, and an empty BAR2 that
        the shared memory fills once the server sends it."""
        path = self.chardev
        if not _may_be_unix_socket(path):
            raise VFIOError("chardev is not a unix client socket")
        if self.shmobj is not None:
            raise VFIOError("do not specify both 'chardev' and 'shm' with ivshmem")
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:
            raise VFIOError.from_oserror("Failed to create socket", e) from e
        unwind.callback(self._close_server)
        self.server = sock
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            raise VFIOError.from_oserror(f"Failed to connect to '{os.fspath(path)}'", e) from e
        sock.setblocking(False)
        if self.msi and self._setup_msi():
            raise VFIOError("msix initialization failed")
        self.peer = protocol.PeerProtocol(self.vectors)
        self.vm_id = -1
        self._register_bar(2, self.ivshmem_size, attr)
        self.machine.set_fd_handler(sock.fileno(), self._server_read)

    def _setup_shm(self, unwind: ExitStack, attr: int) -> None:
        """The shm path: create the object at the size (or open the one that exists), check its
        size, map it and register BAR2 at once."""
        if self.shmobj is None:
            raise VFIOError("Must specify 'chardev' or 'shm' to ivshmem")
        mode = stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO
        try:
            fd = _posixshmem.shm_open(self.shmobj, os.O_CREAT | os.O_RDWR | os.O_EXCL, mode)
        except OSError:
            fd = -1
        else:
            unwind.callback(_posixshmem.shm_unlink, self.shmobj)
            unwind.callback(os.close, fd)
            try:
                os.ftruncate(fd, self.ivshmem_size)
            except OSError:
                error_report("could not truncate shared file")
        if fd < 0:
            try:
                fd = _posixshmem.shm_open(self.shmobj, os.O_CREAT | os.O_RDWR, mode)
            except OSError as e:
                raise VFIOError("could not open shared file") from e
            unwind.callback(os.close, fd)
        self._check_shm_size(fd)
        self._map_shm(fd)
        unwind.callback(self._unmap_shm)
        self._register_bar(2, self.ivshmem_size, attr)

    def _check_shm_size(self, fd: int) -> None:
        """The guest must not reach past the end of the object."""
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise VFIOError(f"exiting: fstat on fd {fd} failed: {os.strerror(e.errno)}") from e
        if self.ivshmem_size > size:
            raise VFIOError(f"Requested memory size greater than shared object size "
                            f"({self.ivshmem_size} > {size})")

    def _map_shm(self, fd: int) -> None:
        try:
            self.shm = mmap.mmap(fd, self.ivshmem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise VFIOError.from_oserror("Failed to mmap shared memory", e) from e
        self.shm_fd = fd

    def _unmap_shm(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self.shm_fd = -1

    def _close_server(self) -> None:
        """The socket, every peer's eventfds and what the loop watched of them."""
        if self.server is None:
            return
        self.machine.set_fd_handler(self.server.fileno(), None)
        self._unwatch_own_eventfds()
        self.server.close()
        self.server = None
        if self.peer is not None:
            self.peer.close()
        self.incoming.close()
        self.ioeventfds.clear()

    def _del_migration_blocker(self) -> None:
        if self.migration_blocker is not None:
            self.machine.migration.migrate_del_blocker(self.migration_blocker)
            self.migration_blocker = None

    def exit(self) -> None:
        """pci_ivshmem_exit, and the fds the seed leaves open: socket, eventfds and shared memory."""
        self._del_migration_blocker()
        self.machine.migration.unregister_savevm(self)
        self._close_server()
        if self.shm is not None:
            os.close(self.shm_fd)
            self._unmap_shm()
        trace("ivshmem_exit", name=self.name)

    def __enter__(self) -> "IVShmemState":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    # -- BAR0: the registers ------------------------------------------------------------------
    def _update_irq(self) -> None:
        """The pin follows status & mask; COMMAND's INTx disable keeps it from the line."""
        self.irq_level = bool(self.intrstatus & self.intrmask)
        disabled = struct.unpack_from("<H", self.config, PCI_COMMAND)[0] & PCI_COMMAND_INTX_DISABLE
        self.irq.set(self.irq_level and not disabled)

    def _intrstatus_write(self, value: int) -> None:
        self.intrstatus = value & U32
        self._update_irq()

    def _io_read(self, addr: int) -> int:
        """Registers decode the exact address; a read of INTRSTATUS clears it."""
        if addr == INTRMASK:
            return self.intrmask
        if addr == INTRSTATUS:
            value = self.intrstatus
            self._intrstatus_write(0)
            return value
        if addr == IVPOSITION:
            return self.vm_id & U32 if self.shm is not None else U32
        return 0

    def _io_write(self, addr: int, value: int) -> None:
        """Writes drop the low address bits; DOORBELL rings peer `value >> 16` on vector `value & 0xff`."""
        addr &= 0xFC
        if addr == INTRMASK:
            self.intrmask = value
            self._update_irq()
        elif addr == INTRSTATUS:
            self._intrstatus_write(value)
        elif addr == DOORBELL:
            dest, vector = (value >> 16) & 0xFFFF, value & 0xFF
            eventfds = self.peer.peers.get(dest, []) if self.peer else []
            trace("ivshmem_doorbell", name=self.name, dest=dest, vector=vector, valid=vector < len(eventfds))
            if vector < len(eventfds):
                os.eventfd_write(eventfds[vector], 1)

    # -- guest access to the BARs ---------------------------------------------------------------
    def bar_read(self, nr: int, addr: int, size: int) -> int:
        """BAR0 in 4-byte register accesses, BAR1 the MSI-X table and PBA, BAR2 the memory."""
        mask = self._access_mask(nr, addr, size)
        if nr == 0:
            return self._io_read(addr) & mask
        if nr == 1:
            return self._msix_mmio_read(addr, size)
        if self.shm is None:
            return 0
        return int.from_bytes(self.shm[addr:addr + size], "little")

    def bar_write(self, nr: int, addr: int, value: int, size: int) -> None:
        """A narrow register write stores its zero-extended value; a DOORBELL write that matches
        an ioeventfd signals it without reaching the device, as KVM does."""
        value &= self._access_mask(nr, addr, size)
        if nr == 0:
            fd = self.ioeventfds.get(value) if addr == DOORBELL and size == 4 else None
            if fd is not None:
                trace("ivshmem_ioeventfd", name=self.name, value=value)
                os.eventfd_write(fd, 1)
            else:
                self._io_write(addr, value)
        elif nr == 1:
            self._msix_mmio_write(addr, value, size)
        elif self.shm is not None:
            self.shm[addr:addr + size] = value.to_bytes(size, "little")

    def _access_mask(self, nr: int, addr: int, size: int) -> int:
        mask = _ACCESS_MASKS.get(size)
        if mask is None or not 0 <= nr < len(self.bar_sizes) or not 0 <= addr <= self.bar_sizes[nr] - size:
            raise VFIOError(f"ivshmem: no {size}-byte access at BAR{nr}+{addr:#x}")
        return mask

    # -- config space -------------------------------------------------------------------------
    def config_read(self, addr: int, size: int) -> int:
        return int.from_bytes(self.config[addr:addr + size], "little")

    def config_write(self, addr: int, value: int, size: int) -> None:
        """pci_default_write_config: writable bits only, then INTx disable and the MSI-X control."""
        default_write_config(self.config, self.wmask, addr, value, size)
        self._update_irq()
        self.msix_write_config(addr, size)

    @property
    def bus_master(self) -> bool:
        return bool(struct.unpack_from("<H", self.config, PCI_COMMAND)[0] & PCI_COMMAND_MASTER)

    # -- MSI-X (QEMU's msix.c, the exclusive-BAR flavour) ---------------------------------------
    def _setup_msi(self) -> int:
        """msix_init_exclusive_bar, then every vector used; -EINVAL when the table does not fit."""
        n = self.vectors
        if not msix_layout_valid(n, 0, MSIX_EXCLUSIVE_BAR_SIZE, MSIX_EXCLUSIVE_BAR_PBA_OFFSET, MSIX_EXCLUSIVE_BAR_SIZE,
                                 same_bar=True):
            return -errno.EINVAL
        pos = PCI_CONFIG_HEADER_SIZE
        self.config[PCI_CAPABILITY_LIST] = pos
        self.config[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        self.config[pos:pos + 2] = bytes((PCI_CAP_ID_MSIX, 0))
        self.wmask[pos:pos + PCI_CAP_MSIX_SIZEOF] = bytes(PCI_CAP_MSIX_SIZEOF)
        self.msix_init(pos, n, table_bar=1, table_offset=0, pba_bar=1, pba_offset=MSIX_EXCLUSIVE_BAR_PBA_OFFSET)
        self._register_bar(1, MSIX_EXCLUSIVE_BAR_SIZE, 0)
        self._use_msix()
        return 0

    def _use_msix(self) -> None:
        """ivshmem maps events to vectors statically, so every vector is in use from the start."""
        for vector in range(self.msix_entries_nr):
            self.msix_vector_use(vector)

    def msix_trigger(self, vector: int) -> None:
        """A sent message is a DMA write, which needs bus master."""
        address, data = self.msix_get_message(vector)
        if tracing():
            trace("msix_notify", name=self.name, vector=vector, address=address, data=data)
        if self.bus_master:
            self.machine.msi_notify(address, data)

    def _msix_mmio_read(self, addr: int, size: int) -> int:
        """The table and PBA take aligned dwords; anything else is unassigned and reads 0."""
        if size != 4 or addr % 4:
            return 0
        pba = addr - MSIX_EXCLUSIVE_BAR_PBA_OFFSET
        if addr < len(self.msix_table):
            return self.msix_table_mmio_read(addr, size)
        if 0 <= pba < len(self.msix_pba):
            return self.msix_pba_mmio_read(pba, size)
        return 0

    def _msix_mmio_write(self, addr: int, value: int, size: int) -> None:
        """A table write may unmask its vector and send what was pending; the PBA is read-only."""
        if size == 4 and not addr % 4 and addr < len(self.msix_table):
            self.msix_table_mmio_write(addr, value, size)

    @property
    def msix_pending(self) -> int:
        """The PBA as one number, as the seed kept it."""
        return int.from_bytes(self.msix_pba, "little")

    @msix_pending.setter
    def msix_pending(self, value: int) -> None:
        self.msix_pba[:] = value.to_bytes(len(self.msix_pba), "little")

    # -- the server's messages ------------------------------------------------------------------
    def _server_read(self) -> None:
        """What the server sent, reassembled into messages: sizeof(long) at a time, as the seed's
        can_receive asks, each with the fd that came along."""
        while self.server is not None:
            try:
                data, fds, _, _ = socket.recv_fds(self.server, protocol.MESSAGE_SIZE, 1)
            except BlockingIOError:
                return
            except OSError as e:
                # QEMU's socket chardev takes a failed read for the peer hanging up.
                trace("ivshmem_server_read_failed", name=self.name, errno=e.errno)
                data, fds = b"", []
            if not data:
                trace("ivshmem_server_closed", name=self.name)
                self.machine.set_fd_handler(self.server.fileno(), None)
                return
            try:
                for value, fd in self.incoming.feed(data, fds):
                    self._process_msg(value, fd)
            except protocol.ProtocolError as e:
                error_report(str(e))
                self.machine.set_fd_handler(self.server.fileno(), None)
                return

    def _process_msg(self, value: int, fd: int) -> None:
        """ivshmem_read after the reassembly: PeerProtocol decides, the device acts."""
        trace("ivshmem_read", name=self.name, posn=value, fd=fd)
        if fd < 0 and value == self.peer.own_id >= 0:
            self._unwatch_own_eventfds()
        event = self.peer.receive(value, fd)
        if isinstance(event, protocol.OwnId):
            self.vm_id = event.id
        elif isinstance(event, protocol.SharedMemory):
            self._receive_shm(event.fd)
        elif isinstance(event, protocol.PeerVector):
            self._receive_eventfd(event)
        elif isinstance(event, protocol.PeerGone):
            for vector in range(self.vectors):
                self.ioeventfds.pop((event.peer << 16) | vector, None)
        elif isinstance(event, protocol.Rejected):
            error_report(event.reason)

    def _receive_shm(self, fd: int) -> None:
        """Size check, then map: a failure is reported and the fd closed, and BAR2 stays empty."""
        try:
            if self.shm is not None:
                raise VFIOError("server sent unexpected shared memory message")
            self._check_shm_size(fd)
            self._map_shm(fd)
        except VFIOError as e:
            error_report(str(e))
            os.close(fd)

    def _receive_eventfd(self, event: protocol.PeerVector) -> None:
        """Our own eventfds interrupt us; anyone's can be rung from DOORBELL through an ioeventfd."""
        if event.peer == self.vm_id:
            os.set_blocking(event.fd, False)
            self.own_eventfds.append(event.fd)
            self.machine.set_fd_handler(event.fd, functools.partial(self._eventfd_interrupt, event.vector))
        if self.ioeventfd:
            self.ioeventfds[(event.peer << 16) | event.vector] = event.fd

    def _unwatch_own_eventfds(self) -> None:
        """The loop lets go before the fds close: epoll would keep a closed fd another holder dup'ed."""
        for fd in self.own_eventfds:
            self.machine.set_fd_handler(fd, None)
        self.own_eventfds.clear()

    def _eventfd_interrupt(self, vector: int) -> None:
        """fake_irqfd with msi, else ivshmem_receive: INTRSTATUS takes the counter's first byte."""
        try:
            count = os.eventfd_read(self.own_eventfds[vector])
        except BlockingIOError:
            return
        trace("ivshmem_interrupt", name=self.name, vector=vector, count=count)
        if self.msi:
            self.msix_notify(vector)
        else:
            self._intrstatus_write(count & 0xFF)

    # -- reset and migration ------------------------------------------------------------------
    def reset(self) -> None:
        """The PCI core's MSI-X reset, then ivshmem_reset: INTRSTATUS cleared, vectors used again."""
        self.msix_reset()
        self._intrstatus_write(0)
        self._use_msix()

    def save(self) -> bytes:
        """ivshmem_save, the savevm handler Machine.migration.savevm calls (unless a blocker
        refuses): config space, then the MSI-X table and PBA with msi, else INTRSTATUS and INTRMASK."""
        if self.msi:
            return bytes(self.config) + self.msix_save()
        return bytes(self.config) + VMSTATE_CONFIG.pack(self.intrstatus, self.intrmask)

    def load(self, data: bytes, version_id: int = 0) -> int:
        """ivshmem_load: 0, or -EINVAL for a newer stream, a peer device, or a config whose
        read-only bytes are not this device's."""
        if version_id > 0:
            return -errno.EINVAL
        if self.role == IVSHMEM_PEER:
            error_report("'peer' devices are not migratable")
            return -errno.EINVAL
        config, rest = data[:PCI_CFG_SPACE_SIZE], data[PCI_CFG_SPACE_SIZE:]
        if any((a ^ b) & ~m & 0xFF for a, b, m in zip(config, self.config, self.wmask)):
            return -errno.EINVAL
        self.config[:] = config
        self._update_irq()
        if self.msi:
            self.msix_load(rest)
            self._use_msix()
        else:
            self.intrstatus, self.intrmask = VMSTATE_CONFIG.unpack(rest[:VMSTATE_CONFIG.size])
            self._update_irq()
        return 0


def _may_be_unix_socket(path) -> bool:
    """A path that names no file yet is left to connect() to refuse, as QEMU's socket chardev does."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
