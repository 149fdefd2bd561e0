"""The mailbox peer: a guest's tests drive a host-side ivshmem peer through the shared memory."""

from __future__ import annotations

import threading

import pytest

from conformance.ivshmem_mailbox import DATA_MAX, MAGIC, MAILBOX_SIZE, MailboxError, MailboxPeer, Responder
from vfio_impl.ivshmem_client import IvshmemClient
from vfio_impl.ivshmem_server import IvshmemServer

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
def responder(server, device):
    client = IvshmemClient(server.socket_path, vectors=2).connect()
    r = Responder(client)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [r.step(0.001) for _ in iter(stop.is_set, True)])
    thread.start()
    yield r
    stop.set()
    thread.join()
    r.close()
    client.close()


def test_the_responder_publishes_itself_and_the_device(device, responder):
    peer = MailboxPeer(memoryview(device.shm), vectors=2, timeout=5)
    assert bytes(device.shm[SIZE - MAILBOX_SIZE:SIZE - MAILBOX_SIZE + 4]) == MAGIC
    assert (peer.id, peer.device_id) == (responder.client.own_id, device.own_id)


@pytest.mark.parametrize("vector", [0, 1])
def test_ring_reaches_the_device_and_a_doorbell_reaches_the_responder(device, responder, vector):
    peer = MailboxPeer(memoryview(device.shm), vectors=2, timeout=5)
    peer.ring(vector)
    assert device.wait_interrupt(5) == vector
    assert not peer.wait_doorbell(vector, timeout=0.05)
    while peer.id not in device.peers:
        device.poll(5)
    device.notify(peer.id, vector)
    assert peer.wait_doorbell(vector)
    assert not peer.wait_doorbell(1 - vector, timeout=0.05)


def test_shared_memory_both_ways(device, responder):
    peer = MailboxPeer(memoryview(device.shm), vectors=2, timeout=5)
    device.shm[0x100:0x104] = b"from"
    assert peer.read_shm(0x100, 4) == b"from"
    peer.write_shm(0x200, b"host" * 8)
    assert bytes(device.shm[0x200:0x220]) == b"host" * 8
    with pytest.raises(ValueError, match="below the mailbox"):
        peer.read_shm(SIZE - MAILBOX_SIZE - 2, 4)
    with pytest.raises(ValueError, match=f"at most {DATA_MAX}"):
        peer.write_shm(0, bytes(DATA_MAX + 1))


def test_a_refused_command_and_a_silent_responder_are_errors(device, responder):
    peer = MailboxPeer(memoryview(device.shm), vectors=2, timeout=0.2)
    with pytest.raises(MailboxError, match="refused command 9"):
        peer._call(9)
    responder.close()
    with pytest.raises(MailboxError, match="no ivshmem responder"):
        MailboxPeer(memoryview(device.shm), vectors=2, timeout=0.05)
