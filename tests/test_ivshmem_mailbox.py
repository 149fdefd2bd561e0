"""The mailbox peer: a guest's tests drive a host-side ivshmem peer through a shared directory."""

from __future__ import annotations

import threading

import pytest

from conformance.ivshmem_mailbox import MailboxError, MailboxPeer, Responder
from vfio_impl.ivshmem.client import IvshmemClient
from vfio_impl.ivshmem.server import IvshmemServer

SIZE = 1 << 16


@pytest.fixture
def server(tmp_path):
    with IvshmemServer(str(tmp_path / "sock"), shm_dir=str(tmp_path), size=SIZE, vectors=2) as s:
        yield s


@pytest.fixture
def device(server):
    """Stands in for the guest's device: a peer whose shared memory the guest sees as BAR2."""
    with IvshmemClient(server.socket_path, vectors=2).connect() as client:
        yield client


@pytest.fixture
def mailbox(tmp_path):
    path = tmp_path / "mailbox"
    path.mkdir()
    return str(path)


@pytest.fixture
def responder(server, device, mailbox):
    client = IvshmemClient(server.socket_path, vectors=2).connect()
    r = Responder(client, mailbox, taken_timeout=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [r.step(0.001) for _ in iter(stop.is_set, True)])
    thread.start()
    yield r
    stop.set()
    thread.join()
    r.close()
    client.close()


def test_the_responder_publishes_itself_and_the_device(device, responder, mailbox):
    peer = MailboxPeer(mailbox, vectors=2, timeout=5)
    assert (peer.id, peer.device_id) == (responder.client.own_id, device.own_id)


@pytest.mark.parametrize("vector", [0, 1])
def test_ring_reaches_the_device_and_a_doorbell_reaches_the_responder(device, responder, mailbox, vector):
    peer = MailboxPeer(mailbox, vectors=2, timeout=5)
    taken = []
    reader = threading.Thread(target=lambda: taken.append(device.wait_interrupt(5)))
    reader.start()
    peer.ring(vector)
    reader.join()
    assert taken == [vector]
    assert not peer.wait_doorbell(vector, timeout=0.05)
    while peer.id not in device.peers:
        device.poll(5)
    device.notify(peer.id, vector)
    assert peer.wait_doorbell(vector)
    assert not peer.wait_doorbell(1 - vector, timeout=0.05)


def test_shared_memory_both_ways(device, responder, mailbox):
    peer = MailboxPeer(mailbox, vectors=2, timeout=5)
    device.shm[0x100:0x104] = b"from"
    assert peer.read_shm(0x100, 4) == b"from"
    peer.write_shm(0x200, b"host" * 8)
    assert bytes(device.shm[0x200:0x220]) == b"host" * 8
    with pytest.raises(MailboxError, match="refused read"):
        peer.read_shm(SIZE - 2, 4)
    with pytest.raises(MailboxError, match="refused write"):
        peer.write_shm(SIZE - 2, b"1234")


def test_a_refused_command_and_a_silent_responder_are_errors(device, responder, mailbox):
    peer = MailboxPeer(mailbox, vectors=2, timeout=2)
    with pytest.raises(MailboxError, match="refused bogus"):
        peer._call("bogus")
    with pytest.raises(MailboxError, match=r"refused ring \(2,\)"):
        peer.ring(2)
    with pytest.raises(MailboxError, match=r"refused ring \(0,\)"):
        peer.ring(0)  # the device never reads its eventfd
    responder.close()
    with pytest.raises(MailboxError, match="no ivshmem responder"):
        MailboxPeer(mailbox, vectors=2, timeout=0.05)


def test_a_new_guest_peer_continues_where_the_last_left_off(device, responder, mailbox):
    """A second test's peer picks up after the first's last request instead of re-reading it, and
    does not take the first's doorbells for its own."""
    first = MailboxPeer(mailbox, vectors=2)
    first.write_shm(0, b"one")
    while first.id not in device.peers:
        device.poll(5)
    device.notify(first.id, 1)
    assert first.wait_doorbell(1)
    second = MailboxPeer(mailbox, vectors=2, timeout=2)
    second.write_shm(0, b"two")
    assert bytes(device.shm[0:3]) == b"two"
    assert not second.wait_doorbell(1, timeout=0.05)
