"""QEMU 7.2's ivshmem-plain and ivshmem-doorbell (hw/misc/ivshmem.c): four registers in BAR0 and
shared memory in BAR2; the doorbell variant adds its MSI-X table and PBA in an exclusive BAR1.

The plain variant has no server, no peers, no interrupt pin and no MSI-X, so its registers are
storage a driver can probe: IVPOSITION reads 0 and a doorbell goes nowhere.

The doorbell variant is a peer of an ivshmem server (`chardev`, its unix socket), as QEMU is:
it reads the server's setup (version, its id, the shared memory) while the kernel is created,
and everything after it (its own eventfds, peers coming and going) on the kernel's worker. An
event on one of its own eventfds is its MSI-X vector; a DOORBELL write rings a peer's eventfd.
"""

from __future__ import annotations

import os
import socket
from typing import Callable

from vfio_impl.ivshmem import protocol

from ..pci import BAR_MEM64, Bar, PciFunction, adjusted_read, adjusted_write

REG_BAR_SIZE = 256
SHMEM_SIZE = 1 << 20
INTRMASK, INTRSTATUS, IVPOSITION, DOORBELL = 0, 4, 8, 12
# msix_init_exclusive_bar for up to 128 vectors: a 4 KiB BAR1, the table at 0, the PBA at 2 KiB.
MSIX_BAR, MSIX_BAR_SIZE, MSIX_TABLE, MSIX_PBA = 1, 4096, 0x000, 0x800
MSIX_CAP = 0x40
SETUP_TIMEOUT = 5.0
OWN_VECTORS_TIMEOUT = 1.0
READ_SIZE = 4096
MAX_FDS_PER_READ = 16


class Ivshmem(PciFunction):
    vendor_id = 0x1AF4
    device_id = 0x1110
    revision = 1
    class_code = 0x050000
    model = "ivshmem"

    def __init__(self, shmem_size: int = SHMEM_SIZE) -> None:
        super().__init__()
        self.add_bar(0, Bar(REG_BAR_SIZE))
        self.add_bar(2, Bar(shmem_size, kind=BAR_MEM64, prefetch=True, ram=True))
        self.intrmask = 0
        self.intrstatus = 0
        # A position comes from the ivshmem server, which the plain device never has.
        self.vm_id = 0

    def _read_reg(self, addr: int) -> int:
        """Reads decode the exact address: only aligned ones hit a register."""
        if addr == INTRMASK:
            return self.intrmask
        if addr == INTRSTATUS:
            value, self.intrstatus = self.intrstatus, 0
            return value
        return self.vm_id if addr == IVPOSITION else 0

    def _write_reg(self, addr: int, value: int) -> None:
        """Writes drop the low address bits."""
        addr &= 0xFC
        if addr == INTRMASK:
            self.intrmask = value
        elif addr == INTRSTATUS:
            self.intrstatus = value
        elif addr == DOORBELL:
            self.doorbell((value >> 16) & 0xFFFF, value & 0xFF)

    def doorbell(self, dest: int, vector: int) -> None:
        """The plain variant has no peers to ring."""

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        """The rest of BAR0's page, which a mapping can reach, is unassigned: it reads 0."""
        return adjusted_read(self._read_reg, offset, size) if offset < REG_BAR_SIZE else 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if offset < REG_BAR_SIZE:
            adjusted_write(self._write_reg, offset, size, value)


class IvshmemDoorbell(Ivshmem):
    """ivshmem-doorbell,chardev=...,vectors=N. Its interrupts are MSI-X only (pin 0): with MSI-X
    off a doorbell is dropped, as ivshmem_vector_notify drops it, and a message sent without bus
    master is lost on the way, so nothing is left pending."""

    model = "ivshmem-doorbell"

    def __init__(self, chardev: str | None = None, vectors: int = 1) -> None:
        if not chardev:
            raise ValueError("ivshmem-doorbell needs the 'chardev' option, the socket of an ivshmem server, as QEMU's "
                             "-device ivshmem-doorbell,chardev=... does: name a running IvshmemServer's socket, or "
                             "build the kernel in `with vfio_impl.ivshmem.server.doorbell_servers(topology) as "
                             "topology:`, which starts one for each doorbell")
        self.chardev = os.fspath(chardev)
        self.vectors = vectors
        self.peer = protocol.PeerProtocol(vectors)
        self.incoming = protocol.Reassembler()
        self.own_eventfds: list[int] = []
        self.shm_fd = -1
        self.watch: Callable | None = None
        self.server: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.server.settimeout(SETUP_TIMEOUT)
            self.server.connect(self.chardev)
            self._recv_setup()
            self.server.setblocking(False)
            size = os.fstat(self.shm_fd).st_size
            if not size or size & (size - 1):
                raise ValueError(f"ivshmem-doorbell: the server's shared memory ({size} bytes) is not a "
                                 "power of two, which pci_register_bar requires of BAR2")
        except BaseException:
            self.stop()
            raise
        super().__init__(size)
        self.vm_id = self.peer.own_id
        self.add_bar(MSIX_BAR, Bar(MSIX_BAR_SIZE))
        self.add_msix(MSIX_CAP, vectors, MSIX_BAR, MSIX_TABLE, MSIX_PBA)

    # -- the server ---------------------------------------------------------------------------
    def _recv_setup(self) -> None:
        """ivshmem_recv_setup: the version, our id, then messages until the shared memory. QEMU's
        main loop reads our own eventfds, which follow, long before a guest runs; reading them
        here too (for a while: a server may have fewer vectors) keeps a test from racing it."""
        while self.shm_fd < 0:
            if not self._read_server():
                raise ConnectionError("ivshmem-doorbell: the server closed the connection during setup")
        self.server.settimeout(OWN_VECTORS_TIMEOUT)
        try:
            while len(self.own_eventfds) < self.vectors and self._read_server():
                pass
        except TimeoutError:
            pass

    def _read_server(self) -> bool:
        """One read of the socket, each message acted on; False at end of file."""
        data, fds, _, _ = socket.recv_fds(self.server, READ_SIZE, MAX_FDS_PER_READ)
        if not data:
            return False
        for value, fd in self.incoming.feed(data, fds):
            self._process_msg(value, fd)
        return True

    def _server_readable(self) -> None:
        if self.server is None:
            return
        try:
            while self._read_server():
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self.watch(self.server.fileno(), None)

    def _process_msg(self, value: int, fd: int) -> None:
        """process_msg: our own eventfds become MSI-X vectors; our id gone is an invalid peer."""
        if fd < 0 and value == self.peer.own_id >= 0:
            return
        event = self.peer.receive(value, fd)
        if isinstance(event, protocol.SharedMemory):
            if self.shm_fd >= 0:
                os.close(event.fd)
            else:
                self.shm_fd = event.fd
        elif isinstance(event, protocol.PeerVector) and event.peer == self.peer.own_id:
            os.set_blocking(event.fd, False)
            self.own_eventfds.append(event.fd)
            if self.watch:
                self._watch_vector(event.vector)

    def _watch_vector(self, vector: int) -> None:
        fd = self.own_eventfds[vector]
        self.watch(fd, lambda: self._vector_notify(vector, fd))

    def _vector_notify(self, vector: int, fd: int) -> None:
        """ivshmem_vector_notify: consumed whether or not MSI-X can send it."""
        if fd not in self.own_eventfds:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.msix_notify(vector)

    def start(self, watch) -> None:
        self.watch = watch
        watch(self.server.fileno(), self._server_readable)
        for vector in range(len(self.own_eventfds)):
            self._watch_vector(vector)

    def stop(self) -> None:
        """Off the worker first, then the socket, every peer's eventfds and the shared memory."""
        if self.server is None:
            return
        if self.watch:
            for fd in (self.server.fileno(), *self.own_eventfds):
                self.watch(fd, None)
        self.own_eventfds.clear()
        self.server.close()
        self.server = None
        self.peer.close()
        self.incoming.close()
        if self.shm_fd >= 0:
            os.close(self.shm_fd)
            self.shm_fd = -1

    def ram_fd(self, index: int) -> int | None:
        return self.shm_fd if index == 2 else None

    # -- registers and BARs ---------------------------------------------------------------------
    def doorbell(self, dest: int, vector: int) -> None:
        """A peer the device does not know, or a vector it did not send, is ignored."""
        eventfds = self.peer.peers.get(dest, [])
        if vector < len(eventfds):
            os.eventfd_write(eventfds[vector], 1)

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        return self.msix_bar_read(offset, size) if bar == MSIX_BAR else super().mmio_read(bar, offset, size)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == MSIX_BAR:
            self.msix_bar_write(offset, size, value)
        else:
            super().mmio_write(bar, offset, size, value)
