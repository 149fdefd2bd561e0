"""The fake's ivshmem-doorbell against a real IvshmemServer, through the Host API: its options,
the setup it reads while the kernel is created, peers it hears of later, and what close_all
leaves behind."""

import os
import select

import pytest

from conformance.backends import describe
from conformance.raw import RawSession, wait_for
from fakekernel import FakeKernel, Topology
from fakekernel.devices.ivshmem import IvshmemDoorbell
from fakekernel.topology import PciDeviceSpec
from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.ivshmem.client import IvshmemClient
from vfio_impl.ivshmem.server import IvshmemServer, doorbell_servers

BDF = "0000:00:06.0"
MSIX = uapi.VFIO_PCI_MSIX_IRQ_INDEX


def topology(**options) -> Topology:
    return Topology([PciDeviceSpec(BDF, "ivshmem-doorbell", 3, options=options)], "doorbell")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def server(tmp_path):
    with IvshmemServer(str(tmp_path / "sock"), size=2 << 20, vectors=2) as s:
        yield s


@pytest.fixture
def kernel(server):
    with FakeKernel(topology(chardev=server.socket_path, vectors=2)) as k:
        yield k


@pytest.fixture
def device(kernel):
    s = RawSession(kernel, describe(kernel, BDF))
    _, _, fd = s.open_device()
    s.enable_device(fd, master=True)
    yield s, fd
    s.close()


def test_doorbell_servers_gives_each_doorbell_naming_none_a_server():
    """As the CI VM's host starts a server before QEMU: 1 MiB, the device's vectors, and nothing
    left on exit. The topology it was given still names no server."""
    before = open_fds()
    given = topology(vectors=2)
    with doorbell_servers(given) as served, FakeKernel(served) as k:
        doorbell = k.functions[BDF]
        assert os.path.exists(doorbell.chardev) and "chardev" not in given.devices[0].options
        with IvshmemClient(doorbell.chardev, vectors=2).connect() as peer:
            assert len(peer.shm) == 1 << 20 and peer.peers == {doorbell.vm_id: 2}
    assert not os.path.exists(doorbell.chardev) and open_fds() == before


def test_doorbell_servers_leaves_a_named_server_alone(server):
    with doorbell_servers(topology(chardev=server.socket_path, vectors=2)) as served:
        assert served.devices[0].options == {"chardev": server.socket_path, "vectors": 2}


def test_a_doorbell_naming_no_server_is_refused_by_the_kernel():
    """The fake kernel starts no server of its own: whoever builds it brings one."""
    before = open_fds()
    with pytest.raises(ValueError, match="'chardev'.*doorbell_servers"):
        FakeKernel(topology(vectors=2))
    with pytest.raises(ValueError, match="'chardev'"):
        IvshmemDoorbell()
    assert open_fds() == before


def test_no_server_no_kernel(tmp_path):
    """QEMU fails to start when nothing listens on its chardev."""
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        FakeKernel(topology(chardev=str(tmp_path / "nobody")))
    assert open_fds() == before


def test_pci_structure_is_qemus(device):
    s, fd = device
    assert s.config_read(fd, 0, 4) == 0x11101AF4 and s.config_read(fd, 0x3D, 1) == 0, "MSI-X only: no pin"
    assert [s.config_read(fd, 0x40 + off, 4) for off in (0, 4, 8)] == [0x00010011, 0x1, 0x801]
    assert [s.region_info(fd, i)[0].size for i in range(3)] == [256, 4096, 2 << 20], "BAR2 is the server's memory"
    assert s.irq_info(fd, MSIX).count == 2 and s.irq_info(fd, uapi.VFIO_PCI_INTX_IRQ_INDEX).count == 0


def test_ivposition_reads_the_id_the_server_assigned(tmp_path, server):
    with IvshmemClient(server.socket_path, vectors=2):
        with FakeKernel(topology(chardev=server.socket_path, vectors=2)) as k:
            s = RawSession(k, describe(k, BDF))
            _, _, fd = s.open_device()
            s.enable_device(fd)
            assert s.bar_read(fd, 0, 8) == 1 == k.functions[BDF].vm_id
            assert sorted(server.peer_ids()) == [0, 1]
            s.close()


def test_peers_that_join_and_leave_later_are_heard_on_the_worker(kernel, device, server):
    s, fd = device
    fn = kernel.functions[BDF]
    with IvshmemClient(server.socket_path, vectors=2) as peer:
        assert wait_for(lambda: len(fn.peer.peers.get(peer.own_id, ())) == 2)
        s.bar_write(fd, 0, 12, (peer.own_id << 16) | 1)
        assert peer.wait_interrupt(2) == 1
    assert wait_for(lambda: peer.own_id not in fn.peer.peers), "the device did not hear the peer leave"


def test_own_eventfds_are_msix_vectors(kernel, device, server):
    s, fd = device
    fds = [s.eventfd(), s.eventfd()]
    kernel.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(MSIX, 0, fds))
    with IvshmemClient(server.socket_path, vectors=2) as peer:
        peer.notify(0, 1)
        assert select.select([fds[1]], [], [], 5)[0] and not select.select([fds[0]], [], [], 0)[0]


def test_bar2_is_the_servers_shared_memory(kernel, device, server):
    s, fd = device
    with IvshmemClient(server.socket_path, vectors=2) as peer:
        m = kernel.mmap(fd, 4096, 2 << 40)
        m[16:21] = b"hello"
        assert bytes(peer.shm[16:21]) == b"hello"
        m.close()


def test_a_server_that_goes_away_leaves_the_device_working(tmp_path):
    before = open_fds()
    with IvshmemServer(str(tmp_path / "sock"), size=1 << 20, vectors=1) as server:
        k = FakeKernel(topology(chardev=server.socket_path))
    s = RawSession(k, describe(k, BDF))
    _, _, fd = s.open_device()
    s.enable_device(fd)
    assert s.bar_read(fd, 0, 8) == 0
    s.bar_write(fd, 0, 0, 0x5A)
    assert s.bar_read(fd, 0, 0) == 0x5A
    s.close()
    k.close_all()
    assert open_fds() == before


def test_close_all_leaves_the_server_and_closes_every_fd(server):
    before = open_fds()
    k = FakeKernel(topology(chardev=server.socket_path, vectors=2))
    assert wait_for(lambda: server.peer_ids() == [0])
    k.close_all()
    assert wait_for(lambda: server.peer_ids() == [])
    assert open_fds() == before
