"""The ivshmem protocol fed by hand: reassembly, fd attachment, a peer's rules, the server's sequence."""

import array
import os
import socket
import struct

import pytest

from vfio_impl.ivshmem import protocol as ivshmem
from vfio_impl.ivshmem.protocol import (
    INITIAL_PEERS,
    MAX_PEERS,
    Message,
    OwnId,
    PeerGone,
    PeerProtocol,
    PeerVector,
    ProtocolError,
    Reassembler,
    Rejected,
    ServerProtocol,
    SharedMemory,
    Version,
    encode,
)


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def eventfds():
    """Makes eventfds and closes whichever the code under test left open."""
    made = []

    def make(n=1):
        fds = [os.eventfd(0) for _ in range(n)]
        made.extend(fds)
        return fds
    yield make
    for fd in made:
        if is_open(fd):
            os.close(fd)


def test_constants_and_encoding():
    assert (ivshmem.PROTOCOL_VERSION, ivshmem.MESSAGE_SIZE, ivshmem.MAX_VECTORS,
            MAX_PEERS, INITIAL_PEERS) == (0, 8, 64, 65535, 16)
    assert encode(-1) == b"\xff" * 8
    assert encode(0x0102) == b"\x02\x01" + bytes(6)
    assert struct.unpack("<q", encode(-(1 << 63)))[0] == -(1 << 63)


# Reassembler

def test_whole_messages_in_one_chunk():
    r = Reassembler()
    assert r.feed(encode(0) + encode(7) + encode(-1)) == [(0, -1), (7, -1), (-1, -1)]


def test_a_message_split_byte_by_byte():
    r = Reassembler()
    data = encode(0x1122334455667788)
    for byte in data[:-1]:
        assert r.feed(bytes([byte])) == []
    assert r.feed(data[-1:]) == [(0x1122334455667788, -1)]


def test_short_read_across_a_message_boundary():
    r = Reassembler()
    data = encode(1) + encode(2) + encode(3)
    assert r.feed(data[:5]) == []
    assert r.feed(data[5:19]) == [(1, -1), (2, -1)]
    assert r.feed(data[19:]) == [(3, -1)]


def test_fd_belongs_to_the_last_message_starting_in_the_chunk(eventfds):
    (fd,) = eventfds()
    r = Reassembler()
    assert r.feed(encode(4) + encode(-1), [fd]) == [(4, -1), (-1, fd)]


def test_fd_waits_for_its_message_to_complete(eventfds):
    (fd,) = eventfds()
    r = Reassembler()
    assert r.feed(encode(1) + encode(2)[:3], [fd]) == [(1, -1)]
    assert r.feed(encode(2)[3:]) == [(2, fd)]


def test_fd_of_a_chunk_that_starts_no_message_goes_to_the_one_in_progress(eventfds):
    (fd,) = eventfds()
    r = Reassembler()
    assert r.feed(encode(9)[:2]) == []
    assert r.feed(encode(9)[2:6], [fd]) == []
    assert r.feed(encode(9)[6:]) == [(9, fd)]


def test_chunk_finishing_one_message_and_starting_another(eventfds):
    (fd,) = eventfds()
    r = Reassembler()
    r.feed(encode(1)[:4])
    assert r.feed(encode(1)[4:] + encode(2), [fd]) == [(1, -1), (2, fd)]


def test_extra_fds_are_closed(eventfds):
    keep, extra1, extra2 = eventfds(3)
    r = Reassembler()
    assert r.feed(encode(5), [keep, extra1, extra2]) == [(5, keep)]
    assert is_open(keep) and not is_open(extra1) and not is_open(extra2)


def test_a_second_fd_for_the_message_in_progress_is_closed(eventfds):
    first, second = eventfds(2)
    r = Reassembler()
    r.feed(encode(5)[:3], [first])
    assert r.feed(encode(5)[3:], [second]) == [(5, first)]
    assert not is_open(second)


def test_close_releases_the_fd_of_a_partial_message(eventfds):
    (fd,) = eventfds()
    r = Reassembler()
    r.feed(encode(5)[:3], [fd])
    r.close()
    assert not is_open(fd)
    assert r.feed(encode(6)) == [(6, -1)]


# PeerProtocol

def setup(protocol, own_id=0):
    assert protocol.receive(0) == Version(0)
    assert protocol.receive(own_id) == OwnId(own_id)


def test_the_version_comes_first():
    p = PeerProtocol()
    with pytest.raises(ProtocolError, match="^server sent version 3, expecting 0$"):
        p.receive(3)


def test_a_version_message_with_an_fd_is_refused(eventfds):
    (fd,) = eventfds()
    with pytest.raises(ProtocolError, match="invalid version message"):
        PeerProtocol().receive(0, fd)
    assert not is_open(fd)


def test_a_peer_sees_the_setup_in_order(eventfds):
    shm, own0, own1, other = eventfds(4)
    p = PeerProtocol()
    assert p.own_id == -1
    setup(p, own_id=3)
    assert p.own_id == 3
    assert p.receive(-1, shm) == SharedMemory(shm)
    assert p.receive(1, other) == PeerVector(1, 0, other)
    assert p.receive(3, own0) == PeerVector(3, 0, own0)
    assert p.receive(3, own1) == PeerVector(3, 1, own1)
    assert p.peers == {1: [other], 3: [own0, own1]}
    assert is_open(shm), "the shared memory fd belongs to the consumer"


def test_after_the_own_id_an_fdless_id_is_a_peer_leaving(eventfds):
    a0, a1, b0 = eventfds(3)
    p = PeerProtocol()
    setup(p)
    p.receive(5, a0)
    p.receive(5, a1)
    p.receive(6, b0)
    assert p.receive(5) == PeerGone(5)
    assert not is_open(a0) and not is_open(a1) and is_open(b0)
    assert p.peers == {6: [b0]}
    assert p.receive(9) == PeerGone(9), "an unknown peer leaving is harmless"


def test_a_returning_peer_counts_its_vectors_from_zero(eventfds):
    old, new = eventfds(2)
    p = PeerProtocol()
    setup(p)
    p.receive(2, old)
    p.receive(2)
    assert p.receive(2, new) == PeerVector(2, 0, new)


def test_a_position_below_minus_one_is_rejected(eventfds):
    (fd,) = eventfds()
    p = PeerProtocol()
    setup(p)
    assert p.receive(-2, fd) == Rejected(-2, "server sent invalid message -2")
    assert not is_open(fd)
    assert p.receive(-(1 << 63)) == Rejected(-(1 << 63), f"server sent invalid message {-(1 << 63)}")


def test_minus_one_without_an_fd_is_no_peer():
    p = PeerProtocol()
    setup(p)
    assert p.receive(-1) == Rejected(-1, "invalid peer -1")


def test_the_peers_table_grows_to_fit_and_stops_at_max_peers(eventfds):
    fd, too_far = eventfds(2)
    p = PeerProtocol()
    setup(p)
    assert p.capacity == INITIAL_PEERS
    p.receive(INITIAL_PEERS - 1, fd)
    assert p.capacity == INITIAL_PEERS
    assert p.receive(100) == PeerGone(100)
    assert p.capacity == 101
    assert p.receive(MAX_PEERS - 1) == PeerGone(MAX_PEERS - 1)
    assert p.capacity == MAX_PEERS
    assert p.receive(MAX_PEERS, too_far) == Rejected(MAX_PEERS, "failed to resize peers array")
    assert not is_open(too_far) and p.capacity == MAX_PEERS


def test_an_own_id_beyond_the_table_limit_is_rejected():
    p = PeerProtocol()
    p.receive(0)
    assert p.receive(MAX_PEERS) == Rejected(MAX_PEERS, "failed to resize peers array")
    assert p.own_id == -1
    assert p.receive(1 << 40) == Rejected(1 << 40, "failed to resize peers array")


def test_vectors_limit_refuses_extra_eventfds(eventfds):
    a, b, c = eventfds(3)
    p = PeerProtocol(vectors=2)
    setup(p)
    p.receive(1, a)
    p.receive(1, b)
    assert p.receive(1, c) == Rejected(1, "Too many eventfd received, device has 2 vectors")
    assert not is_open(c) and p.peers == {1: [a, b]}


def test_without_a_vectors_limit_eventfds_keep_coming(eventfds):
    fds = eventfds(70)
    p = PeerProtocol()
    setup(p)
    assert [p.receive(4, fd).vector for fd in fds] == list(range(70))


def test_own_id_zero_then_zero_with_an_fd_is_our_vector(eventfds):
    (fd,) = eventfds()
    p = PeerProtocol()
    setup(p, own_id=0)
    assert p.receive(0, fd) == PeerVector(0, 0, fd)


def test_close_releases_every_eventfd(eventfds):
    fds = eventfds(3)
    p = PeerProtocol()
    setup(p)
    for peer, fd in zip((1, 1, 2), fds):
        p.receive(peer, fd)
    p.close()
    assert not any(map(is_open, fds)) and p.peers == {}


def test_reassembler_feeds_the_peer_protocol(eventfds):
    shm, vec = eventfds(2)
    r, p = Reassembler(), PeerProtocol()
    stream = encode(0) + encode(2) + encode(-1) + encode(2)
    events = [p.receive(*m) for m in r.feed(stream[:20])]
    events += [p.receive(*m) for m in r.feed(stream[20:24], [shm])]
    events += [p.receive(*m) for m in r.feed(stream[24:], [vec])]
    assert events == [Version(0), OwnId(2), SharedMemory(shm), PeerVector(2, 0, vec)]


# ServerProtocol

SHM = 99


def test_a_first_peer_gets_version_id_shm_and_its_own_vectors():
    s = ServerProtocol()
    peer_id, messages = s.join([10, 11], SHM)
    assert peer_id == 0
    assert messages == [Message(0, 0), Message(0, 0), Message(0, -1, SHM),
                        Message(0, 0, 10), Message(0, 0, 11)]


def test_join_advertises_both_ways_in_join_order():
    s = ServerProtocol()
    s.join([10, 11], SHM)
    s.join([20, 21], SHM)
    peer_id, messages = s.join([30, 31], SHM)
    assert peer_id == 2
    assert messages == [
        Message(2, 0), Message(2, 2), Message(2, -1, SHM),
        Message(0, 2, 30), Message(0, 2, 31), Message(1, 2, 30), Message(1, 2, 31),
        Message(2, 0, 10), Message(2, 0, 11), Message(2, 1, 20), Message(2, 1, 21),
        Message(2, 2, 30), Message(2, 2, 31),
    ]


def test_leave_tells_everyone_else():
    s = ServerProtocol()
    for fd in (10, 20, 30):
        s.join([fd], SHM)
    assert s.leave(1) == [Message(0, 1), Message(2, 1)]
    assert list(s.peers) == [0, 2]
    assert s.leave(0) == [Message(2, 0)]
    assert s.leave(2) == []


def test_ids_roll_on_instead_of_reusing_the_one_just_freed():
    s = ServerProtocol()
    for _ in range(3):
        s.join([], SHM)
    s.leave(1)
    assert s.join([], SHM)[0] == 3


def test_ids_wrap_at_uint16_and_skip_those_in_use():
    s = ServerProtocol()
    s.join([], SHM)
    s.join([], SHM)
    s.cur_id = 0xFFFE
    assert [s.join([], SHM)[0] for _ in range(3)] == [0xFFFE, 0xFFFF, 2]
    s.leave(0)
    s.cur_id = 0xFFFF
    assert s.join([], SHM)[0] == 0


def test_id_search_gives_up_after_65535_tries_as_qemu_does():
    s = ServerProtocol()
    s.peers = dict.fromkeys(range(0xFFFF), ())
    with pytest.raises(ProtocolError, match="cannot allocate new client id"):
        s.allocate_id()
    assert s.allocate_id() == 0xFFFF, "the counter moved on to the one free id"
    with pytest.raises(ProtocolError):
        s.allocate_id()


def test_server_and_peer_agree():
    """Every message of a join, fed to a peer, rebuilds the server's table."""
    s = ServerProtocol()
    s.join([10], SHM)
    s.join([20], SHM)
    peer_id, messages = s.join([30], SHM)
    p = PeerProtocol()
    for m in messages:
        if m.to == peer_id:
            p.receive(m.value, m.fd)
    assert p.own_id == peer_id
    assert p.peers == {i: list(v) for i, v in s.peers.items()}
    p.peers.clear()


@pytest.mark.parametrize("read_size", [1, 3, 5, 8, 11, 16, 4096])
def test_reassembler_against_linux_recvmsg(read_size, eventfds):
    """One message and at most one fd per sendmsg, as the server sends: any read size gets each fd right."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sent = {2: eventfds()[0], 4: eventfds()[0], 5: eventfds()[0]}
    with sender, receiver:
        for value in range(1, 7):
            rights = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sent[value]]))]
                      if value in sent else [])
            sender.sendmsg([encode(value)], rights)
        sender.shutdown(socket.SHUT_WR)
        r, got = Reassembler(), []
        while True:
            data, fds, _, _ = socket.recv_fds(receiver, read_size, 4)
            if not data:
                break
            got += r.feed(data, fds)
    assert [value for value, _ in got] == list(range(1, 7))
    for value, fd in got:
        assert (fd >= 0) == (value in sent)
        if fd >= 0:
            assert os.fstat(fd).st_ino == os.fstat(sent[value]).st_ino
            os.close(fd)
