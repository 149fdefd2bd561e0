"""A second ivshmem peer that a test in a VM can drive: the host runs a responder on the server,
and the guest asks it for things through a mailbox in the last page of the shared memory.

The guest has no way to the host's server but the shared memory itself, and a doorbell rung while
its MSI-X is off is lost. So requests never ride on doorbells: the responder polls the mailbox,
and doorbells are only what the tests measure. Run the host half with

    python3 -m conformance.ivshmem_mailbox -S SOCKET [--ready FILE]

Layout of the mailbox page (little-endian), at `shm_size - MAILBOX_SIZE`:

    0   magic        "IVMB" once the responder serves
    4   peer id      the responder's id at the server
    8   device id    the other peer's id (the device under test), -1 while there is none
    12  request      sequence number, written last by the guest
    16  ack          the request number the responder finished
    20  command      RING / COUNT / READ / WRITE
    24  arg0, arg1   command arguments
    32  result       a signed 64-bit answer
    64  data         READ's answer and WRITE's payload
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import time

MAILBOX_SIZE = 4096
MAGIC = b"IVMB"
HEADER = struct.Struct("<4siiIIIIIq")
DATA = 64
DATA_MAX = MAILBOX_SIZE - DATA
REQUEST, ACK = 12, 16
RING, COUNT, READ, WRITE = 1, 2, 3, 4
POLL_S = 0.001


class MailboxError(Exception):
    """The responder did not answer, or answered a request it could not do."""


class Responder:
    """The host half: an ivshmem peer that counts the doorbells it gets per vector and carries
    out the guest's requests. `client` is a connected `IvshmemClient`."""

    def __init__(self, client):
        self.client = client
        self.shm = client.shm
        self.base = len(self.shm) - MAILBOX_SIZE
        self.received: dict[int, int] = {}
        self.served = 0
        self.shm[self.base:self.base + DATA] = bytes(DATA)
        self._publish()
        self.shm[self.base:self.base + 4] = MAGIC

    def device_id(self) -> int:
        others = sorted(p for p in self.client.peers if p != self.client.own_id)
        return others[0] if others else -1

    def _publish(self) -> None:
        struct.pack_into("<ii", self.shm, self.base + 4, self.client.own_id, self.device_id())

    def step(self, timeout: float) -> None:
        """One round: doorbells and server messages (waiting up to `timeout`), then the mailbox."""
        vector = self.client.wait_interrupt(timeout)
        while vector is not None:
            self.received[vector] = self.received.get(vector, 0) + 1
            vector = self.client.wait_interrupt(0)
        self.client.poll(0)
        self._publish()
        request, ack = struct.unpack_from("<II", self.shm, self.base + REQUEST)
        if request != ack:
            self._serve(request)

    def _serve(self, request: int) -> None:
        _, _, _, _, _, command, arg0, arg1, _ = HEADER.unpack_from(self.shm, self.base)
        result = 0
        if command == RING:
            self.client.notify(self.device_id(), arg0)
        elif command == COUNT:
            result = self.received.get(arg0, 0)
        elif command == READ and arg1 <= DATA_MAX:
            self.shm[self.base + DATA:self.base + DATA + arg1] = self.shm[arg0:arg0 + arg1]
        elif command == WRITE and arg1 <= DATA_MAX:
            self.shm[arg0:arg0 + arg1] = self.shm[self.base + DATA:self.base + DATA + arg1]
        else:
            result = -1
        struct.pack_into("<q", self.shm, self.base + 32, result)
        struct.pack_into("<I", self.shm, self.base + ACK, request)
        self.served += 1

    def close(self) -> None:
        self.shm[self.base:self.base + 4] = bytes(4)


class MailboxPeer:
    """The guest half: the `ivshmem_peer` fixture's interface over a mapping of the device's
    BAR2 (`shm`, a writable memoryview or mmap)."""

    def __init__(self, shm, vectors: int, timeout: float = 10.0):
        self.shm = shm
        self.base = len(shm) - MAILBOX_SIZE
        self.vectors = vectors
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while bytes(shm[self.base:self.base + 4]) != MAGIC or self._ids()[1] < 0:
            if time.monotonic() > deadline:
                raise MailboxError("no ivshmem responder in the shared memory's last page "
                                   "(is `python3 -m conformance.ivshmem_mailbox` running on the host?)")
            time.sleep(POLL_S)
        self.id, self.device_id = self._ids()
        self._seen: dict[int, int] = {}

    def _ids(self) -> tuple[int, int]:
        return struct.unpack_from("<ii", self.shm, self.base + 4)

    def _call(self, command: int, arg0: int = 0, arg1: int = 0) -> int:
        request = (struct.unpack_from("<I", self.shm, self.base + REQUEST)[0] + 1) & 0xFFFFFFFF
        struct.pack_into("<III", self.shm, self.base + 20, command, arg0, arg1)
        struct.pack_into("<I", self.shm, self.base + REQUEST, request)
        deadline = time.monotonic() + self.timeout
        while struct.unpack_from("<I", self.shm, self.base + ACK)[0] != request:
            if time.monotonic() > deadline:
                raise MailboxError(f"the ivshmem responder did not answer request {request} "
                                   f"(command {command}) within {self.timeout} s")
            time.sleep(POLL_S)
        result = struct.unpack_from("<q", self.shm, self.base + 32)[0]
        if result < 0:
            raise MailboxError(f"the ivshmem responder refused command {command} ({arg0}, {arg1})")
        return result

    def ring(self, vector: int) -> None:
        self._call(RING, vector)

    def wait_doorbell(self, vector: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            count = self._call(COUNT, vector)
            if count > self._seen.get(vector, 0):
                self._seen[vector] = count
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def read_shm(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        self._call(READ, offset, n)
        return bytes(self.shm[self.base + DATA:self.base + DATA + n])

    def write_shm(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.shm[self.base + DATA:self.base + DATA + len(data)] = data
        self._call(WRITE, offset, len(data))

    def _check(self, offset: int, n: int) -> None:
        if n > DATA_MAX or offset < 0 or offset + n > self.base:
            raise ValueError(f"{n} bytes at {offset:#x}: the responder copies at most {DATA_MAX} "
                             f"bytes below the mailbox at {self.base:#x}")


def main(argv: list[str] | None = None) -> int:
    from vfio_impl.ivshmem_client import IvshmemClient

    ap = argparse.ArgumentParser(prog="python3 -m conformance.ivshmem_mailbox", description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", dest="socket", required=True, help="the ivshmem server's socket")
    ap.add_argument("--ready", metavar="FILE", help="create FILE once the responder serves")
    args = ap.parse_args(argv)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    with IvshmemClient(args.socket) as client:
        responder = Responder(client)
        print(f"ivshmem responder: peer {client.own_id}, mailbox at {responder.base:#x}", flush=True)
        if args.ready:
            open(args.ready, "w").close()
        try:
            while not stop:
                responder.step(POLL_S)
        finally:
            responder.close()
        print(f"ivshmem responder: served {responder.served} requests, doorbells {responder.received}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
