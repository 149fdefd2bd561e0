"""The ivshmem device model (vfio_impl.vmm.ivshmem, seed 004) on a Machine: properties, size strings,
every realize error with its unwinding, the shm and server backends, BAR0's registers, INTx,
MSI-X, reset, save/load, ioeventfd, and each step of the server protocol."""

import _posixshmem
import errno
import os
import socket
import struct
import uuid

import pytest

from vfio_impl import VFIOError
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.ivshmem.client import IvshmemClient
from vfio_impl.ivshmem.protocol import encode
from vfio_impl.ivshmem.server import IvshmemServer
from vfio_impl.vmm.ivshmem import (
    DOORBELL,
    INTRMASK,
    INTRSTATUS,
    IVPOSITION,
    MIGRATION_BLOCKER,
    IVShmemState,
    ivshmem_get_size,
)
from vfio_impl.vmm.machine import Machine, VirtualClock

MiB = 1 << 20
COMMAND, BAR1, BAR2, BAR3 = 0x04, 0x14, 0x18, 0x1C
MEMORY, MASTER, INTX_DISABLE = 0x2, 0x4, 0x400
MSIX_CAP, MSIX_ENABLE, MSIX_MASKALL = 0x40, 0x8000, 0x4000
ADDRESS, DATA = 0xFEE00000, 0x4040
U32 = 0xFFFFFFFF


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


@pytest.fixture
def machine():
    m = Machine(VirtualClock())
    yield m
    m.close()


@pytest.fixture
def shm_name():
    name = f"ivshmem-test-{uuid.uuid4().hex}"
    yield name
    if shm_exists(name):
        _posixshmem.shm_unlink(name)


@pytest.fixture
def server(tmp_path):
    with IvshmemServer(str(tmp_path / "sock"), size=4 * MiB, vectors=2) as s:
        yield s


def realized(machine, **props) -> IVShmemState:
    """A device on the server, its own eventfds and memory read from the loop."""
    dev = IVShmemState.realize(machine, **props)
    assert machine.run_until(lambda: dev.shm is not None and len(dev.own_eventfds) == props.get("vectors", 1))
    return dev


@pytest.fixture
def served(machine, server):
    with realized(machine, chardev=server.socket_path, vectors=2) as dev:
        yield dev


@pytest.fixture
def peer(server, served):
    """A client that joined after the device, once the device has heard of it."""
    with IvshmemClient(server.socket_path, vectors=2) as client:
        assert served.machine.run_until(lambda: len(served.peer.peers.get(client.own_id, ())) == 2)
        yield client


def program_msix(dev, vector: int, masked: bool = False) -> None:
    """The guest's MSI-X set-up: bus master, the table entry, then enable."""
    dev.config_write(COMMAND, MEMORY | MASTER, 2)
    for off, value in ((0, ADDRESS), (4, 0), (8, DATA + vector), (12, int(masked))):
        dev.bar_write(1, 16 * vector + off, value, 4)
    dev.config_write(MSIX_CAP + 2, MSIX_ENABLE, 2)


# -- properties and size strings ------------------------------------------------------------
def test_defaults_with_an_shm_object(machine, shm_name):
    with IVShmemState.realize(machine, shm=shm_name) as dev:
        assert (dev.ivshmem_size, dev.vectors, dev.ioeventfd, dev.msi, dev.ivshmem_64bit) == (4 * MiB, 1, False, True, 1)
        assert dev.migration_blocker is None, "master is the default role"
        assert (dev.config_read(0, 4), dev.config_read(0x08, 4), dev.config_read(0x2C, 4)) == (0x11101AF4, 0x05000000,
                                                                                              0x11001AF4)
        assert (dev.config_read(COMMAND, 2), dev.config_read(0x3D, 1)) == (0x3, 1)
        assert dev.bar_sizes == [0x100, 0, 4 * MiB, 0, 0, 0], "no server, no MSI-X BAR"
        assert dev.config_read(0x34, 1) == 0 and dev.msix_cap == 0


@pytest.mark.parametrize("text,size", [("1", MiB), ("2M", 2 * MiB), ("8m", 8 * MiB), ("1G", 1 << 30),
                                       ("2g", 2 << 30), (" 16", 16 * MiB), ("+4", 4 * MiB), ("4MB", 4 * MiB),
                                       ("8796093022208M", 1 << 63)])
def test_size_strings_are_mib_by_default(text, size):
    """strtoull then one suffix character: whatever follows it is never looked at."""
    assert ivshmem_get_size(text) == size


@pytest.mark.parametrize("text", ["4k", "abc", "0x10", " 4 M", "-", "4K", "1T"])
def test_an_unknown_suffix_is_an_invalid_ram_size(text):
    with pytest.raises(VFIOError) as e:
        ivshmem_get_size(text)
    assert e.value.message == f"invalid ram size: {text}"


@pytest.mark.parametrize("text", ["3", "0", "", "M", "6G", "-1", "17592186044416"])
def test_size_must_be_a_power_of_two(text):
    """0 is none, and the 64-bit arithmetic wraps: -1 MiB and 2^44 MiB are not ones either."""
    with pytest.raises(VFIOError, match="^size must be power of 2$"):
        ivshmem_get_size(text)


def test_realize_takes_the_size_string(machine, shm_name):
    with IVShmemState.realize(machine, shm=shm_name, size="2m") as dev:
        assert dev.ivshmem_size == dev.bar_sizes[2] == os.stat(f"/dev/shm/{shm_name}").st_size == 2 * MiB


# -- realize errors and their unwinding -------------------------------------------------------
def _errors(tmp_path, listening, shm_name):
    regular = tmp_path / "regular"
    regular.write_text("")
    missing = str(tmp_path / "missing")
    return [
        (dict(shm=shm_name, size="4k"), "invalid ram size: 4k"),
        (dict(shm=shm_name, size="3M"), "size must be power of 2"),
        (dict(shm=shm_name, ioeventfd=True, msi=False), "ioeventfd/irqfd requires MSI"),
        (dict(shm=shm_name, role="slave"), "'role' must be 'peer' or 'master'"),
        (dict(shm=shm_name, role="peer", chardev=str(regular)), "chardev is not a unix client socket"),
        (dict(chardev=42), "chardev is not a unix client socket"),
        (dict(chardev=listening, shm=shm_name), "do not specify both 'chardev' and 'shm' with ivshmem"),
        (dict(), "Must specify 'chardev' or 'shm' to ivshmem"),
        (dict(chardev=missing), f"Failed to connect to '{missing}'"),
        (dict(chardev=listening, vectors=0), "msix initialization failed"),
        (dict(chardev=listening, vectors=129), "msix initialization failed"),
        (dict(shm="no/slash"), "could not open shared file"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_each_realize_error_unwinds_everything(machine, tmp_path, shm_name, case):
    """A socket that listens and never answers: the device connects and must let go again."""
    listening = ScriptedServer(str(tmp_path / "listening"))
    props, message = _errors(tmp_path, listening.path, shm_name)[case]
    before = open_fds()
    with pytest.raises(VFIOError) as e:
        IVShmemState.realize(machine, **props)
    assert e.value.message == message
    assert open_fds() == before and not machine.fd_handlers
    assert not shm_exists(shm_name)
    listening.close()


def test_an_shm_object_smaller_than_the_size_is_refused(machine, shm_name):
    fd = _posixshmem.shm_open(shm_name, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, MiB)
    os.close(fd)
    before = open_fds()
    with pytest.raises(VFIOError) as e:
        IVShmemState.realize(machine, shm=shm_name)
    assert e.value.message == "Requested memory size greater than shared object size (4194304 > 1048576)"
    assert open_fds() == before and os.stat(f"/dev/shm/{shm_name}").st_size == MiB, "not ours to remove"


# -- the shm backend ------------------------------------------------------------------------
def test_an_object_it_creates_is_truncated_to_the_size(machine, shm_name):
    with IVShmemState.realize(machine, shm=shm_name, size="8M") as dev:
        assert os.stat(f"/dev/shm/{shm_name}").st_size == 8 * MiB
        dev.bar_write(2, 0x10, 0x12345678, 4)
    with open(f"/dev/shm/{shm_name}", "rb") as f:
        assert f.read(0x14)[0x10:] == bytes.fromhex("78563412"), "the object outlives the device"


def test_an_object_that_exists_is_opened_as_it_is(machine, shm_name):
    fd = _posixshmem.shm_open(shm_name, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 8 * MiB)
    os.pwrite(fd, b"kept", 0x100)
    os.close(fd)
    with IVShmemState.realize(machine, shm=shm_name, size="4M") as dev:
        assert os.stat(f"/dev/shm/{shm_name}").st_size == 8 * MiB
        assert dev.bar_read(2, 0x100, 4) == int.from_bytes(b"kept", "little")
        assert dev.bar_read(0, IVPOSITION, 4) == 0, "mapped at once, with the id it never got"


@pytest.mark.parametrize("use64,low", [(1, 0xFFC0000C), (0, 0xFFC00008)])
def test_bar2_is_prefetchable_and_64_bit_per_use64(machine, shm_name, use64, low):
    with IVShmemState.realize(machine, shm=shm_name, use64=use64) as dev:
        for off in (BAR2, BAR3):
            dev.config_write(off, U32, 4)
        assert (dev.config_read(BAR2, 4), dev.config_read(BAR3, 4)) == (low, U32 if use64 else 0)


# -- BAR0 --------------------------------------------------------------------------------------
@pytest.fixture
def plain(machine, shm_name):
    with IVShmemState.realize(machine, shm=shm_name, msi=False) as dev:
        yield dev


def test_intrmask_is_read_write_and_intrstatus_clears_on_read(plain):
    plain.bar_write(0, INTRMASK, 0xA5A5A5A5, 4)
    plain.bar_write(0, INTRSTATUS, 0x33, 4)
    assert plain.bar_read(0, INTRMASK, 4) == 0xA5A5A5A5
    assert [plain.bar_read(0, INTRSTATUS, 4) for _ in range(2)] == [0x33, 0]


@pytest.mark.parametrize("offset", [DOORBELL, 0x10, 0xFC])
def test_other_offsets_read_zero(plain, offset):
    assert plain.bar_read(0, offset, 4) == 0


def test_registers_take_four_byte_accesses_at_their_address(plain):
    """A narrow read decodes the exact address; a narrow write stores its value, zero-extended;
    a write drops the low address bits."""
    plain.bar_write(0, INTRMASK, 0x11223344, 4)
    assert [plain.bar_read(0, INTRMASK, n) for n in (1, 2)] == [0x44, 0x3344]
    assert plain.bar_read(0, INTRMASK + 1, 1) == 0
    plain.bar_write(0, INTRMASK + 2, 0xAA, 1)
    assert plain.bar_read(0, INTRMASK, 4) == 0xAA


@pytest.mark.parametrize("nr,offset,size", [(0, 0, 3), (0, 0x100, 4), (0, 0xFE, 4), (1, 0, 4), (6, 0, 4)])
def test_an_access_outside_a_bar_is_refused(plain, nr, offset, size):
    with pytest.raises(VFIOError):
        plain.bar_read(nr, offset, size)


def test_the_irq_line_is_status_and_mask(plain):
    line = plain.irq
    assert line.name == "ivshmem INTA"
    plain.bar_write(0, INTRSTATUS, 0x2, 4)
    plain.bar_write(0, INTRMASK, 0x1, 4)
    assert not line.level
    plain.bar_write(0, INTRMASK, 0x3, 4)
    assert line.level
    plain.config_write(COMMAND, INTX_DISABLE, 2)
    assert not line.level and plain.irq_level, "INTx disable keeps the pin off the line"
    plain.config_write(COMMAND, 0, 2)
    assert line.level
    plain.bar_read(0, INTRSTATUS, 4)
    assert not line.level and line.history == [True, False, True, False]


# -- the server backend -------------------------------------------------------------------------
def test_ivposition_reads_minus_one_until_the_memory_is_mapped(scripted):
    """The seed answers its id only once shm_fd is set: an id that came before the memory
    still reads -1 (checked before the id arrives, a test could not tell the two apart)."""
    srv, dev = scripted
    srv.send(0)
    srv.send(3)
    assert dev.machine.run_until(lambda: dev.vm_id == 3)
    assert dev.bar_read(0, IVPOSITION, 4) == U32 and dev.bar_read(2, 0, 4) == 0
    srv.send(-1, srv.memfd(4 * MiB))
    assert dev.machine.run_until(lambda: dev.shm is not None)
    assert dev.bar_read(0, IVPOSITION, 4) == 3


def test_msix_has_vectors_entries_each_in_use(machine, server):
    with realized(machine, chardev=server.socket_path, vectors=2) as dev:
        assert dev.bar_sizes[:3] == [0x100, 4096, 4 * MiB]
        assert [dev.config_read(MSIX_CAP + off, n) for off, n in ((0, 1), (2, 2), (4, 4), (8, 4))] == [
            0x11, 1, 0x1, 0x801]
        assert dev.config_read(0x34, 1) == MSIX_CAP and dev.msix_entry_used == [1, 1]
        assert [dev.bar_read(1, 12 + 16 * v, 4) for v in range(2)] == [1, 1], "every vector starts masked"
        dev.config_write(BAR1, U32, 4)
        assert dev.config_read(BAR1, 4) == 0xFFFFF000


def test_an_own_eventfd_is_an_msix_notify(served, peer):
    program_msix(served, 1)
    peer.notify(served.vm_id, 1)
    assert served.machine.run_until(lambda: served.machine.msi_messages == [(ADDRESS, DATA + 1)])


def test_a_masked_vector_pends_until_unmasked(served, peer):
    program_msix(served, 0, masked=True)
    peer.notify(served.vm_id, 0)
    assert served.machine.run_until(lambda: served.msix_is_pending(0))
    assert served.bar_read(1, 0x800, 4) == 1 and served.machine.msi_messages == []
    served.bar_write(1, 12, 0, 4)
    assert served.machine.msi_messages == [(ADDRESS, DATA)] and not served.msix_is_pending(0)


def test_with_msix_off_the_seed_keeps_a_doorbell_pending(served, peer):
    """The seed calls msix_notify whatever the enable bit (QEMU 7.2 drops it): the function is
    masked, so the vector pends and goes out when the guest enables MSI-X."""
    served.config_write(COMMAND, MEMORY | MASTER, 2)
    peer.notify(served.vm_id, 1)
    assert served.machine.run_until(lambda: served.msix_is_pending(1))
    program_msix(served, 1)
    assert served.machine.msi_messages == [(ADDRESS, DATA + 1)]


def test_without_bus_master_the_message_is_lost(served, peer):
    program_msix(served, 0)
    served.config_write(COMMAND, MEMORY, 2)
    peer.notify(served.vm_id, 0)
    assert not served.machine.run_until(lambda: served.machine.msi_messages, 0.2)
    assert not served.msix_is_pending(0)


def test_the_function_mask_holds_vectors_until_cleared(served, peer):
    program_msix(served, 1)
    served.config_write(MSIX_CAP + 2, MSIX_ENABLE | MSIX_MASKALL, 2)
    peer.notify(served.vm_id, 1)
    assert served.machine.run_until(lambda: served.msix_is_pending(1))
    served.config_write(MSIX_CAP + 2, MSIX_ENABLE, 2)
    assert served.machine.msi_messages == [(ADDRESS, DATA + 1)]


def test_without_msi_an_own_eventfd_writes_intrstatus(machine, server):
    """ivshmem_receive: INTRSTATUS takes the first byte of the eventfd's counter."""
    with realized(machine, chardev=server.socket_path, msi=False) as dev, \
            IvshmemClient(server.socket_path) as client:
        dev.bar_write(0, INTRMASK, U32, 4)
        client.notify(dev.vm_id, 0)
        client.notify(dev.vm_id, 0)
        assert machine.run_until(lambda: dev.irq.level)
        assert dev.bar_read(0, INTRSTATUS, 4) == 2 and not dev.irq.level
        assert dev.bar_sizes[1] == 0 and dev.msix_cap == 0


def test_doorbell_rings_a_peer_on_a_vector(served, peer):
    for vector in (1, 0):
        served.bar_write(0, DOORBELL, (peer.own_id << 16) | vector, 4)
        assert peer.wait_interrupt(2) == vector


@pytest.mark.parametrize("high", [0x100, 0xFF00])
def test_the_doorbell_vector_is_the_values_low_byte(served, peer, high):
    """ivshmem_io_write takes `val & 0xff`: bits 8-15 name no vector of their own."""
    served.bar_write(0, DOORBELL, (peer.own_id << 16) | high | 1, 4)
    assert peer.wait_interrupt(2) == 1
    served.bar_write(0, DOORBELL, (peer.own_id << 16) | high, 4)
    assert peer.wait_interrupt(2) == 0
    assert peer.wait_interrupt(0.1) is None


def test_an_invalid_dest_or_vector_is_ignored(served, peer):
    with TraceRecorder() as tr:
        for dest, vector in ((peer.own_id, 2), (peer.own_id, 0xFF), (0xFFFF, 0), (peer.own_id + 1, 0)):
            served.bar_write(0, DOORBELL, (dest << 16) | vector, 4)
    assert [e["valid"] for e in tr.named("ivshmem_doorbell")] == [False] * 4
    assert peer.wait_interrupt(0.1) is None


def test_ioeventfd_binds_every_peers_eventfds_to_doorbell(machine, server):
    with realized(machine, chardev=server.socket_path, vectors=2, ioeventfd=True) as dev, \
            IvshmemClient(server.socket_path, vectors=2) as client:
        other = client.own_id
        assert machine.run_until(lambda: len(dev.ioeventfds) == 4)
        assert sorted(dev.ioeventfds) == sorted((p << 16) | v for p in (dev.vm_id, other) for v in (0, 1))
        with TraceRecorder() as tr:
            dev.bar_write(0, DOORBELL, (other << 16) | 1, 4)
            dev.bar_write(0, DOORBELL, (other << 16) | 0x100 | 1, 4)
        assert [e["value"] for e in tr.named("ivshmem_ioeventfd")] == [(other << 16) | 1]
        assert len(tr.named("ivshmem_doorbell")) == 1, "a value that matches no ioeventfd reaches the device"
        assert client.wait_interrupt(2) == 1
    assert machine.run_until(lambda: sorted(dev.ioeventfds) == [] or other not in dev.peer.peers)


def test_only_a_four_byte_doorbell_write_is_taken_by_an_ioeventfd(machine, server):
    """memory_region_add_eventfd(DOORBELL, 4, ...): KVM matches the write's size too, so a
    narrower write whose value matches reaches the device, which rings the same eventfd."""
    with realized(machine, chardev=server.socket_path, vectors=2, ioeventfd=True) as dev:
        assert dev.vm_id == 0 and machine.run_until(lambda: len(dev.ioeventfds) == 2)
        program_msix(dev, 1)
        for size in (4, 2, 1):
            with TraceRecorder() as tr:
                dev.bar_write(0, DOORBELL, 1, size)
            taken = [e["value"] for e in tr.named("ivshmem_ioeventfd")]
            rung = [(e["dest"], e["vector"]) for e in tr.named("ivshmem_doorbell")]
            assert (taken, rung) == (([1], []) if size == 4 else ([], [(0, 1)])), f"a {size}-byte write"
            assert machine.run_until(lambda: len(machine.msi_messages) == 1)
            machine.msi_messages.clear()


def test_a_peer_that_leaves_has_its_eventfds_closed(served, server):
    client = IvshmemClient(server.socket_path, vectors=2).connect()
    assert served.machine.run_until(lambda: len(served.peer.peers.get(client.own_id, ())) == 2)
    fds = list(served.peer.peers[client.own_id])
    client.close()
    assert served.machine.run_until(lambda: client.own_id not in served.peer.peers)
    assert not any(str(fd) in open_fds() and fd not in served.own_eventfds for fd in fds)


def test_exit_leaves_the_server_and_closes_every_fd(machine, server):
    before = open_fds()
    dev = realized(machine, chardev=server.socket_path, vectors=2)
    dev.exit()
    assert machine.run_until(lambda: server.peer_ids() == []), "the server did not see the device leave"
    assert open_fds() == before and not machine.fd_handlers


# -- the protocol, step by step, from a server the test scripts -------------------------------
class ScriptedServer:
    """A listening socket the device connects to; the test sends each message itself."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.conn: socket.socket | None = None
        self.fds: list[int] = []

    def accept(self) -> None:
        self.conn, _ = self.listener.accept()

    def send(self, value: int, fd: int = -1) -> None:
        if fd < 0:
            self.conn.sendall(encode(value))
        else:
            socket.send_fds(self.conn, [encode(value)], [fd])

    def eventfd(self) -> int:
        self.fds.append(os.eventfd(0, os.EFD_CLOEXEC))
        return self.fds[-1]

    def memfd(self, size: int) -> int:
        self.fds.append(os.memfd_create("scripted-shm", os.MFD_CLOEXEC))
        os.ftruncate(self.fds[-1], size)
        return self.fds[-1]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        if self.conn:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def scripted(machine, tmp_path):
    before = open_fds()
    srv = ScriptedServer(str(tmp_path / "scripted"))
    dev = IVShmemState.realize(machine, chardev=str(tmp_path / "scripted"), vectors=2)
    srv.accept()
    yield srv, dev
    dev.exit()
    srv.close()
    assert open_fds() == before


def test_messages_are_reassembled_across_short_reads(scripted):
    srv, dev = scripted
    stream = encode(0) + encode(7)
    for piece in (stream[:3], stream[3:11], stream[11:]):
        srv.conn.sendall(piece)
        dev.machine.poll(0.5)
    assert dev.peer.version == 0 and dev.vm_id == 7


def test_the_setup_sequence_maps_the_memory_and_wires_our_vectors(scripted):
    srv, dev = scripted
    srv.send(0)
    srv.send(3)
    srv.send(-1, srv.memfd(4 * MiB))
    for _ in range(2):
        srv.send(3, srv.eventfd())
    assert dev.machine.run_until(lambda: len(dev.own_eventfds) == 2)
    assert dev.bar_read(0, IVPOSITION, 4) == 3 and dev.shm is not None
    assert all(dev.machine.has_fd_handler(fd) for fd in dev.own_eventfds)


def test_a_version_other_than_zero_ends_the_conversation(scripted):
    srv, dev = scripted
    with TraceRecorder() as tr:
        srv.send(1)
        srv.send(3)
        assert dev.machine.run_until(lambda: tr.named("error"))
    assert tr.named("error")[0]["message"] == "server sent version 1, expecting 0"
    assert not dev.machine.has_fd_handler(dev.server.fileno()) and dev.vm_id == -1


def test_a_position_below_minus_one_is_invalid(scripted):
    srv, dev = scripted
    srv.send(0)
    with TraceRecorder() as tr:
        srv.send(-2)
        srv.send(5)
        assert dev.machine.run_until(lambda: dev.vm_id == 5)
    assert [e["message"] for e in tr.named("error")] == ["server sent invalid message -2"]


def test_the_peers_table_grows_from_16_up_to_65535(scripted):
    srv, dev = scripted
    srv.send(0)
    srv.send(1)
    assert dev.machine.run_until(lambda: dev.vm_id == 1) and dev.peer.capacity == 16
    with TraceRecorder() as tr:
        srv.send(40, srv.eventfd())
        srv.send(0xFFFF, srv.eventfd())
        assert dev.machine.run_until(lambda: tr.named("error"))
    assert dev.peer.capacity == 41 and len(dev.peer.peers[40]) == 1
    assert tr.named("error")[0]["message"] == "failed to resize peers array"


def test_no_fd_means_our_id_first_and_a_peer_leaving_after(scripted):
    srv, dev = scripted
    srv.send(0)
    srv.send(2)
    srv.send(9, srv.eventfd())
    assert dev.machine.run_until(lambda: dev.vm_id == 2 and 9 in dev.peer.peers)
    srv.send(9)
    assert dev.machine.run_until(lambda: 9 not in dev.peer.peers) and dev.vm_id == 2


def test_shared_memory_smaller_than_the_size_is_reported_and_closed(scripted):
    srv, dev = scripted
    srv.send(0)
    srv.send(1)
    small = srv.memfd(MiB)
    before = open_fds()
    with TraceRecorder() as tr:
        srv.send(-1, small)
        assert dev.machine.run_until(lambda: tr.named("error"))
    assert tr.named("error")[0]["message"] == "Requested memory size greater than shared object size (4194304 > 1048576)"
    assert open_fds() == before and dev.bar_read(0, IVPOSITION, 4) == U32


def test_a_second_shared_memory_is_refused(scripted):
    srv, dev = scripted
    for value in (0, 1):
        srv.send(value)
    srv.send(-1, srv.memfd(4 * MiB))
    assert dev.machine.run_until(lambda: dev.shm is not None)
    with TraceRecorder() as tr:
        srv.send(-1, srv.memfd(4 * MiB))
        assert dev.machine.run_until(lambda: tr.named("error"))
    assert tr.named("error")[0]["message"] == "server sent unexpected shared memory message"


def test_a_server_that_hangs_up_is_let_go(scripted):
    srv, dev = scripted
    srv.send(0)
    srv.conn.close()
    srv.conn = None
    assert dev.machine.run_until(lambda: not dev.machine.has_fd_handler(dev.server.fileno()))


# -- reset, migration, role ---------------------------------------------------------------------
def test_reset_clears_intrstatus_and_msix_and_uses_every_vector_again(served, peer):
    program_msix(served, 1)
    served.bar_write(0, INTRMASK, 0x7, 4)
    served.bar_write(0, INTRSTATUS, 0x5, 4)
    served.reset()
    assert (served.bar_read(0, INTRMASK, 4), served.bar_read(0, INTRSTATUS, 4)) == (0x7, 0), "the seed keeps the mask"
    assert not served.msix_enabled() and served.bar_read(1, 16 + 8, 4) == 0 and served.msix_entry_used == [2, 2]
    program_msix(served, 1)
    peer.notify(served.vm_id, 1)
    assert served.machine.run_until(lambda: served.machine.msi_messages == [(ADDRESS, DATA + 1)])


def test_save_and_load_carry_the_msix_state(machine, server, served):
    program_msix(served, 1, masked=True)
    served.msix_pending = 1 << 1
    state = served.save()
    assert len(state) == 256 + 2 * 16 + 1
    with realized(machine, chardev=server.socket_path, vectors=2) as target:
        assert target.load(state) == 0
        assert target.msix_enabled() and target.msix_is_pending(1)
        target.bar_write(1, 16 + 12, 0, 4)
        assert machine.msi_messages == [(ADDRESS, DATA + 1)], "unmasking delivers what was pending"


def test_save_and_load_without_msi_carry_intrstatus_and_intrmask(machine, shm_name):
    with IVShmemState.realize(machine, shm=shm_name, msi=False) as dev:
        dev.bar_write(0, INTRMASK, 0x3, 4)
        dev.bar_write(0, INTRSTATUS, 0x1, 4)
        state = dev.save()
        assert state[256:] == struct.pack(">II", 0x1, 0x3)
        dev.bar_write(0, INTRMASK, 0, 4)
        dev.bar_read(0, INTRSTATUS, 4)
        assert dev.load(state) == 0 and dev.irq.level
        assert (dev.intrmask, dev.intrstatus) == (0x3, 0x1)


def test_load_refuses_a_newer_stream_a_peer_and_another_device(machine, shm_name):
    with IVShmemState.realize(machine, shm=shm_name, role="peer") as peer_role:
        state = peer_role.save()
        with TraceRecorder() as tr:
            assert peer_role.load(state) == -errno.EINVAL
        assert [e["message"] for e in tr.named("error")] == ["'peer' devices are not migratable"]
    with IVShmemState.realize(machine, shm=shm_name, role="master") as dev:
        assert dev.load(state, version_id=1) == -errno.EINVAL
        other = bytearray(state)
        other[2] ^= 1
        assert dev.load(bytes(other)) == -errno.EINVAL


def test_a_peer_is_blocked_from_migration_until_it_exits(machine, shm_name):
    """The peer role's migration blocker blocks: the machine's save refuses with its message."""
    dev = IVShmemState.realize(machine, shm=shm_name, role="peer")
    assert dev.migration_blocker == MIGRATION_BLOCKER
    with pytest.raises(VFIOError) as e:
        machine.migration.savevm()
    assert e.value.message == MIGRATION_BLOCKER
    dev.exit()
    assert dev.migration_blocker is None and machine.migration.savevm() == []


def test_a_master_migrates_through_the_machine(machine, shm_name):
    """ivshmem registers its savevm handlers at realize: the machine's stream carries its state to
    the device of the same id on another machine, and nothing once it has exited."""
    with IVShmemState.realize(machine, shm=shm_name, msi=False) as dev:
        dev.bar_write(0, INTRMASK, 0x3, 4)
        dev.bar_write(0, INTRSTATUS, 0x1, 4)
        [section] = machine.migration.savevm()
        assert (section.idstr, section.instance_id, section.version_id) == ("ivshmem", 0, 0)
        target_machine = Machine(VirtualClock())
        with IVShmemState.realize(target_machine, shm=shm_name, msi=False) as target:
            target_machine.migration.loadvm([section])
            assert (target.intrmask, target.intrstatus) == (0x3, 0x1) and target.irq.level
        target_machine.close()
    assert machine.migration.savevm() == []


def test_a_failed_realize_of_a_peer_holds_no_blocker(machine, tmp_path):
    with pytest.raises(VFIOError):
        IVShmemState.realize(machine, chardev=str(tmp_path / "absent.sock"), role="peer")
    assert machine.migration.blockers == [] and machine.migration.handlers == []
    assert machine.migration.savevm() == []
