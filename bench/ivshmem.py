"""Figure 7: ivshmem through the project's server and clients.

7:  a doorbell round trip between two peers (IvshmemClient.notify, the other peer's
    wait_interrupt, and its doorbell back) against the raw eventfd ping-pong of figure 1. The
    other peer is a forked process, forked before the server's thread starts; while the round
    trips are timed, both peers and the raw responder share one CPU, as in figure 1.
7j: peers joining an IvshmemServer, each a full IvshmemClient.connect(), against the syscalls
    of a join done by hand (connect, accept, the three setup messages with the shared memory's
    fd, its mmap). Peers join in batches that then leave, as the server's own 1,000-peer test
    does: with every peer present, each would hold every other's eventfds, 500,000 fds in all.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import sys
import tempfile
import time

from vfio_impl.ivshmem.client import IvshmemClient
from vfio_impl.ivshmem.server import IvshmemServer

from .harness import Figure, Target, compare, one_cpu
from .irq import Responder
from .scale import Scale

WAIT_S = 5.0
BATCH = 25
SHM_SIZE = 4 << 20


def _until(done, client: IvshmemClient, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        client.poll(0.05)


def _answering_peer(path: str, ready_w: int) -> None:
    """The forked peer: joins, tells the parent its id, then rings back every doorbell it gets
    until the server goes away."""
    try:
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.001)
        with IvshmemClient(path, vectors=1) as peer:
            os.write(ready_w, struct.pack("=i", peer.own_id))
            _until(lambda: peer.peers, peer, "no other peer joined")
            other = next(iter(peer.peers))
            while peer.wait_interrupt(None) is not None:
                peer.notify(other, 0)
    finally:
        os._exit(0)


def _doorbells(client: IvshmemClient, other: int):
    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            client.notify(other, 0)
            if client.wait_interrupt(WAIT_S) is None:
                raise TimeoutError("the other peer never rang back")
        return time.perf_counter() - t0
    return run


def _joins(server: IvshmemServer, path: str, rates: list[float]):
    """n joins in batches of BATCH; only the connect() calls are timed."""
    def run(n: int) -> float:
        took, joined = 0.0, n
        while n > 0:
            batch = []
            for _ in range(min(n, BATCH)):
                t0 = time.perf_counter()
                batch.append(IvshmemClient(path, vectors=1).connect())
                took += time.perf_counter() - t0
            for client in batch:
                client.close()
            deadline = time.monotonic() + WAIT_S
            while server.peer_ids() and time.monotonic() < deadline:
                time.sleep(0.001)
            n -= len(batch)
        rates.append(joined / took)
        return took
    return run


def _raw_joins(path: str, shm_fd: int):
    """A join's syscalls by hand: the server side's accept and three 8-byte messages (version,
    id, then the shared memory with its fd), the peer's receive and mmap."""
    fds = array.array("i", [shm_fd])
    setup = [(struct.pack("<q", value), []) for value in (0, 0)] + [(struct.pack("<q", -1), fds)]

    def run(n: int) -> float:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(BATCH)
            t0 = time.perf_counter()
            for _ in range(n):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
                    peer.connect(path)
                    conn, _ = listener.accept()
                    with conn:
                        for data, passed in setup:
                            conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)] if passed else [])
                        got, received = b"", []
                        while len(got) < 24:
                            data, ancillary, _, _ = peer.recvmsg(24 - len(got), socket.CMSG_SPACE(4))
                            got += data
                            received += [int.from_bytes(a[2][:4], sys.byteorder) for a in ancillary]
                        with mmap.mmap(received[0], SHM_SIZE):
                            pass
                        os.close(received[0])
            took = time.perf_counter() - t0
        os.unlink(path)
        return took
    return run


def figure_7(scale: Scale) -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ivshmem.sock")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            _answering_peer(path, ready_w)
        os.close(ready_w)
        raw_fd = os.eventfd(0, os.EFD_CLOEXEC)
        raw = Responder(raw_fd)
        try:
            with IvshmemServer(path, size=SHM_SIZE, vectors=1), IvshmemClient(path, vectors=1) as client:
                other = struct.unpack("=i", os.read(ready_r, 4))[0]
                _until(lambda: other in client.peers, client, "the other peer never joined")
                with one_cpu() as cpu:
                    for process in (pid, raw.pid):
                        os.sched_setaffinity(process, {cpu})
                    doorbells = compare(_doorbells(client, other),
                                        raw.round_trips(lambda: os.eventfd_write(raw_fd, 1)),
                                        scale.pings, scale.ping_repeats)
        finally:
            os.waitpid(pid, 0)
            raw.close()
            os.close(raw_fd)
            os.close(ready_r)
        with IvshmemServer(path, size=SHM_SIZE, vectors=1) as server:
            shm_fd, rates = os.dup(server.shm_fd), []
            try:
                joins = compare(_joins(server, path, rates), _raw_joins(os.path.join(tmp, "raw.sock"), shm_fd),
                                scale.peers, max(1, scale.repeats // 4), rate=True)
            finally:
                os.close(shm_fd)
        rate = sorted(rates[1:])[len(rates[1:]) // 2]
    return [Figure("7", "ivshmem doorbell round trip, peer to peer", "IvshmemClient.notify to a peer process "
                   "whose wait_interrupt returns and rings back, through IvshmemServer's eventfds",
                   "raw eventfd ping-pong with a user process (as figure 1)", doorbells, Target("<=", 2)),
            Figure("7j", f"ivshmem peers joining ({scale.peers:,} per repeat)",
                   "IvshmemClient.connect() to an IvshmemServer, in batches of 25 that then leave",
                   "a join's syscalls by hand: connect, accept, 3 setup messages, the shm fd's mmap",
                   joins, note=f"{rate:,.0f} joins/s through the server")]

