"""The ivshmem server protocol (docs/specs/ivshmem-spec.rst), with no sockets in it.

Every message is one little-endian int64, and at most one file descriptor rides
along with it (SCM_RIGHTS). The device, the client and the server feed bytes and
fds into the classes here and act on what comes back, so each side is tested
without I/O and the socket drivers stay thin.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Sequence

PROTOCOL_VERSION = 0
MESSAGE_SIZE = 8
MAX_VECTORS = 64
MAX_PEERS = 0xFFFF
INITIAL_PEERS = 16
ID_SPACE = 0x10000  # the server's counter is a uint16

_message = struct.Struct("<q")


class ProtocolError(Exception):
    """The other side broke the protocol; the connection cannot go on."""


def encode(value: int) -> bytes:
    return _message.pack(value)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


class Reassembler:
    """Turns a unix stream's chunks back into (value, fd) messages.

    Linux ends a recvmsg() right after the data of a sendmsg() that carried fds,
    so the fds of a chunk belong to the last message that starts in it, or to the
    message in progress when none starts there.
    """

    def __init__(self) -> None:
        self._partial = bytearray()
        self._partial_fd = -1

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[tuple[int, int]]:
        stream = self._partial + data
        owner = max(0, (len(stream) - 1) // MESSAGE_SIZE)
        fd_of = {0: self._partial_fd}
        if fds:
            if fd_of.get(owner, -1) < 0:
                fd_of[owner] = fds[0]
                _close(fds[1:])
            else:
                _close(fds)
        complete = len(stream) // MESSAGE_SIZE
        messages = [(value, fd_of.get(index, -1)) for index, (value,)
                    in enumerate(_message.iter_unpack(stream[:complete * MESSAGE_SIZE]))]
        self._partial = stream[complete * MESSAGE_SIZE:]
        self._partial_fd = fd_of.get(complete, -1)
        return messages

    def close(self) -> None:
        _close([self._partial_fd])
        self._partial_fd = -1
        self._partial.clear()


# What a peer (the device, a client) learns from the server.

@dataclass(frozen=True, slots=True)
class Version:
    version: int


@dataclass(frozen=True, slots=True)
class OwnId:
    id: int


@dataclass(frozen=True, slots=True)
class SharedMemory:
    fd: int


@dataclass(frozen=True, slots=True)
class PeerVector:
    peer: int
    vector: int
    fd: int


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message the peer ignores, as QEMU reports it and carries on."""
    value: int
    reason: str


Event = Version | OwnId | SharedMemory | PeerVector | PeerGone | Rejected


class PeerProtocol:
    """A peer's side of the server protocol, by seed 004's rules (ivshmem_read).

    Current QEMU sends the protocol version first; the seed predates it, so the
    version check is ivshmem_recv_setup's and the rest is the seed's. `vectors`,
    when given, refuses eventfds beyond it as current QEMU does (the seed would
    overrun its table).
    """

    def __init__(self, vectors: int | None = None) -> None:
        self.vectors = vectors
        self.version: int | None = None
        self.own_id = -1
        self.capacity = INITIAL_PEERS
        self.peers: dict[int, list[int]] = {}

    def receive(self, value: int, fd: int = -1) -> Event:
        if self.version is None:
            return self._receive_version(value, fd)
        if value < -1:
            return self._reject(value, fd, f"server sent invalid message {value}")
        if value >= self.capacity:
            if value + 1 > MAX_PEERS:
                return self._reject(value, fd, "failed to resize peers array")
            self.capacity = value + 1
        if fd < 0:
            if value >= 0 and self.own_id == -1:
                self.own_id = value
                return OwnId(value)
            if value == -1:
                return Rejected(value, "invalid peer -1")
            _close(self.peers.pop(value, ()))
            return PeerGone(value)
        if value == -1:
            return SharedMemory(fd)
        eventfds = self.peers.setdefault(value, [])
        if self.vectors is not None and len(eventfds) >= self.vectors:
            return self._reject(value, fd, "Too many eventfd received, "
                                f"device has {self.vectors} vectors")
        eventfds.append(fd)
        return PeerVector(value, len(eventfds) - 1, fd)

    def _receive_version(self, value: int, fd: int) -> Version:
        if fd >= 0:
            os.close(fd)
            raise ProtocolError("server sent invalid version message")
        if value != PROTOCOL_VERSION:
            raise ProtocolError(f"server sent version {value}, expecting {PROTOCOL_VERSION}")
        self.version = value
        return Version(value)

    @staticmethod
    def _reject(value: int, fd: int, reason: str) -> Rejected:
        _close([fd])
        return Rejected(value, reason)

    def close(self) -> None:
        for eventfds in self.peers.values():
            _close(eventfds)
        self.peers.clear()


# What the server owes its peers.

@dataclass(frozen=True, slots=True)
class Message:
    """One message for peer `to`; `fd` is lent, the server still owns it."""
    to: int
    value: int
    fd: int = -1


class ServerProtocol:
    """The server's bookkeeping (contrib/ivshmem-server): ids, and who hears what.

    `peers` keeps join order, which is the order QEMU's server advertises them in.
    """

    def __init__(self) -> None:
        self.cur_id = 0
        self.peers: dict[int, tuple[int, ...]] = {}

    def allocate_id(self) -> int:
        """The next id not in use, so a peer that just left is not reused at once."""
        for _ in range(ID_SPACE - 1):
            if self.cur_id not in self.peers:
                break
            self.cur_id = (self.cur_id + 1) % ID_SPACE
        else:
            raise ProtocolError("cannot allocate new client id")
        peer_id = self.cur_id
        self.cur_id = (self.cur_id + 1) % ID_SPACE
        return peer_id

    def join(self, vectors: Sequence[int], shm_fd: int) -> tuple[int, list[Message]]:
        """A new peer with its eventfds: its id, and every message its arrival causes."""
        peer_id = self.allocate_id()
        vectors = tuple(vectors)
        messages = [Message(peer_id, PROTOCOL_VERSION), Message(peer_id, peer_id),
                    Message(peer_id, -1, shm_fd)]
        messages += [Message(other, peer_id, fd) for other in self.peers for fd in vectors]
        messages += [Message(peer_id, other, fd)
                     for other, other_vectors in self.peers.items() for fd in other_vectors]
        messages += [Message(peer_id, peer_id, fd) for fd in vectors]
        self.peers[peer_id] = vectors
        return peer_id, messages

    def leave(self, peer_id: int) -> list[Message]:
        """The peer is gone: everyone else hears its id with no fd."""
        del self.peers[peer_id]
        return [Message(other, peer_id) for other in self.peers]
