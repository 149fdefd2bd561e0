"""ivshmem-client against the project's server: doorbells both ways, shared bytes, peers, the CLI by a pipe."""

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vfio_impl.ivshmem_client import HELP, IvshmemClient, main
from vfio_impl.ivshmem_server import IvshmemServer
from vfio_impl.uapi.ivshmem import PeerGone, PeerVector, ProtocolError, encode

REPO = Path(__file__).resolve().parents[1]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def server(tmp_path):
    with IvshmemServer(str(tmp_path / "sock"), vectors=2, size=1 << 16) as s:
        yield s


@pytest.fixture
def client(server):
    made = []

    def connect(**kwargs):
        kwargs.setdefault("vectors", server.vectors)
        made.append(IvshmemClient(server.socket_path, **kwargs).connect())
        return made[-1]
    yield connect
    for c in made:
        c.close()


def until(predicate, client, timeout=2.0):
    """Handles `client`'s server messages until `predicate()` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        client.poll(0.05)


def test_connect_learns_id_memory_and_the_peers_before_it(client):
    a = client()
    b = client()
    assert (a.own_id, a.vectors, a.peers) == (0, 2, {})
    assert (b.own_id, b.vectors, b.peers) == (1, 2, {0: 2})
    assert len(a.shm) == 1 << 16


def test_two_clients_ring_each_other_both_ways(client):
    a, b = client(), client()
    until(lambda: a.peers == {1: 2}, a)
    a.notify(1, 1)
    assert b.wait_interrupt(2) == 1
    b.notify(0, 0)
    assert a.wait_interrupt(2) == 0
    assert a.wait_interrupt(0.01) is None and b.wait_interrupt(0) is None


def test_the_memory_is_shared(client):
    a, b = client(), client()
    a.shm[100:105] = b"hello"
    assert b.shm[100:105] == b"hello"


def test_poll_reports_peers_coming_and_going(client):
    a = client()
    b = client()
    events = []
    until(lambda: events.extend(a.poll(0.05)) or len(events) == 2, a)
    assert events == [PeerVector(1, 0, events[0].fd), PeerVector(1, 1, events[1].fd)]
    b.close()
    assert a.poll(2) == [PeerGone(1)]
    assert a.peers == {}


def test_notify_all_vectors_of_a_peer(client):
    a, b = client(), client()
    until(lambda: 1 in a.peers, a)
    a.notify_all(1)
    assert sorted([b.wait_interrupt(1), b.wait_interrupt(1)]) == [0, 1]
    assert b.wait_interrupt(0) is None


def test_notify_all_rings_every_peer_but_us(client):
    a, b, c = client(), client(), client()
    until(lambda: len(a.peers) == 2, a)
    a.notify_all()
    for other in (b, c):
        assert sorted([other.wait_interrupt(1), other.wait_interrupt(1)]) == [0, 1]
    assert a.wait_interrupt(0) is None


def test_a_client_can_ring_itself(client):
    a = client()
    a.notify(a.own_id, 1)
    assert a.wait_interrupt(1) == 1


def test_notify_errors_in_qemu_words(client):
    a = client()
    with pytest.raises(ValueError, match="^cannot find peer_id = 9$"):
        a.notify(9, 0)
    with pytest.raises(ValueError, match="^invalid vector 2 on peer 0$"):
        a.notify(0, 2)
    with pytest.raises(ValueError, match="cannot find peer_id = 9"):
        a.notify_all(9)


def test_wait_interrupt_takes_vectors_that_arrive_while_waiting(server):
    """Without `vectors`, connect() may return before our eventfds arrive; waiting still works."""
    with IvshmemClient(server.socket_path).connect() as a, IvshmemClient(server.socket_path, vectors=2).connect() as b:
        until(lambda: a.own_id in b.peers and b.peers[a.own_id] == 2, b)
        b.notify(a.own_id, 1)
        assert a.wait_interrupt(2) == 1 and a.vectors == 2


def test_dump(client):
    a = client()
    client()
    until(lambda: 1 in a.peers, a)
    lines = a.dump().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "our_id = 0", "  vector 0 is enabled", "  vector 1 is enabled",
        "peer_id = 1", "  vector 0 is enabled", "  vector 1 is enabled"]


def test_no_fd_left_behind(server):
    baseline = open_fds()
    with IvshmemClient(server.socket_path, vectors=2) as a, IvshmemClient(server.socket_path, vectors=2) as b:
        until(lambda: 1 in a.peers, a)
        a.notify(1, 0)
        assert b.wait_interrupt(1) == 0
        view = memoryview(a.shm)
        view[0] = 1
        view.release()
    deadline = time.monotonic() + 2
    while server.peer_ids() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert open_fds() == baseline


def test_the_server_going_away(tmp_path):
    baseline = open_fds()
    server = IvshmemServer(str(tmp_path / "sock"))
    with server:
        a = IvshmemClient(server.socket_path, vectors=1).connect()
    with pytest.raises(ConnectionError):
        a.poll(1)
    a.close()
    assert open_fds() == baseline


def fake_server(path, *messages):
    """A listening socket that sends `messages` (values, or (value, fd)) to its first client, and then nothing."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        for value, *fds in map(lambda m: m if isinstance(m, tuple) else (m,), messages):
            socket.send_fds(conn, [encode(value)], fds)
        conn.recv(1)
        conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("messages, error, match", [
    ((1,), ProtocolError, "^server sent version 1, expecting 0$"),
    ((0, 3), TimeoutError, "no setup from the ivshmem server"),
    ((0, 3, -2), ProtocolError, "server sent invalid message -2"),
    ((0, 3, "empty shm"), ProtocolError, "Failed to mmap shared memory"),
])
def test_connect_fails_cleanly(tmp_path, messages, error, match):
    baseline = open_fds()
    empty = os.memfd_create("empty")
    messages = [(-1, empty) if value == "empty shm" else value for value in messages]
    listener, thread = fake_server(tmp_path / "sock", *messages)
    c = IvshmemClient(str(tmp_path / "sock"))
    with pytest.raises(error, match=match):
        c.connect(timeout=0.2)
    thread.join()
    listener.close()
    os.close(empty)
    assert open_fds() == baseline


def test_connect_without_a_server(tmp_path):
    with pytest.raises(FileNotFoundError):
        IvshmemClient(str(tmp_path / "nothing")).connect()


# the console script

def test_main_flags(tmp_path, capsys):
    assert main(["-h"]) == 0
    assert "-S <unix_sock_path>" in capsys.readouterr().err
    assert main(["-x"]) == 1
    assert main(["-S", str(tmp_path / "nothing")]) == 1
    assert "cannot connect to server" in capsys.readouterr().err


class Cli:
    """The console script on a pipe: commands in, lines out."""

    def __init__(self, socket_path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from vfio_impl.ivshmem_client import main; sys.exit(main())",
             "-S", socket_path], env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, text, timeout=5.0):
        deadline = time.monotonic() + timeout
        while text.encode() not in self.out:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} not in {self.out!r}"
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                assert chunk, f"{text!r} not in {self.out!r} at its end"
                self.out += chunk
        before, _, self.out = self.out.partition(text.encode())
        return before.decode()

    def finish(self):
        self.proc.stdin.close()
        code = self.proc.wait(timeout=5)
        rest = self.out + self.proc.stdout.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code, rest.decode()


def test_cli_driven_by_a_pipe(server, client):
    b = client()
    cli = Cli(server.socket_path)
    try:
        cli.send("dump\n")
        cli.expect("our_id = 1\n")
        cli.expect("peer_id = 0\n")
        until(lambda: b.peers.get(1) == 2, b)
        cli.send("int 0 1\n")
        assert b.wait_interrupt(2) == 1
        b.notify(1, 0)
        cli.expect("receive notification from peer_id=1 vector=0\n")
        for command in ("int all\n", "int 0 all\n"):
            cli.send(command)
            assert sorted(b.wait_interrupt(2) for _ in range(2)) == [0, 1]
        cli.send("int 7 0;int 0 5\nbogus\nhelp\n")
        cli.expect("cannot find peer_id = 7\ninvalid vector 5 on peer 0\ninvalid command, type help\n" + HELP)
        cli.send("int 0 1")
    finally:
        code, _ = cli.finish()
    assert code == 0
    assert b.wait_interrupt(2) == 1, "a last command with no newline still runs"
    until(lambda: b.peers == {}, b)


def test_cli_reports_the_server_going_away(tmp_path):
    server = IvshmemServer(str(tmp_path / "sock"))
    with server:
        cli = Cli(server.socket_path)
        cli.send("dump\n")
        cli.expect("our_id = 0\n")
    assert cli.proc.wait(timeout=5) == 1
    cli.expect("disconnected from server\n")
    cli.finish()
