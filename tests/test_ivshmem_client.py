"""ivshmem-client against the project's server: doorbells both ways, shared bytes, peers, the CLI by a pipe."""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vfio_impl.ivshmem.client import HELP, IvshmemClient, main
from vfio_impl.ivshmem.protocol import PeerGone, PeerVector, ProtocolError, encode
from vfio_impl.ivshmem.server import IvshmemServer

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
    while (server.peer_ids() or open_fds() != baseline) and time.monotonic() < deadline:
        time.sleep(0.001)   # the server thread closes its side of the peer after dropping it
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


def test_verbose_says_ids_vectors_and_fds_in_words(server, client, capsys):
    a = client(verbose=True)
    b = client()
    until(lambda: a.peers == {1: 2}, a)
    b.close()
    assert a.poll(2) == [PeerGone(1)]
    a.notify(0, 1)
    assert re.sub(r"fd[= ]\d+", "fd N", capsys.readouterr().out).splitlines() == [
        "server protocol version 0",
        "our_id=0",
        "mapped 65536 bytes of shared memory",
        "  new vector 0 (fd N) for peer id 0",
        "  new vector 1 (fd N) for peer id 0",
        "new peer id = 1",
        "  new vector 0 (fd N) for peer id 1",
        "  new vector 1 (fd N) for peer id 1",
        "delete peer id = 1",
        "notify peer 0 on vector 1, fd N",
    ]


# the console script

def test_main_flags(capsys):
    assert main(["-h"]) == 0
    assert "-S <unix_sock_path>" in capsys.readouterr().err
    assert main(["-x"]) == 1


RETRY = 0.05


class Cli:
    """The console script on pipes: commands in, lines out; it retries every RETRY seconds."""

    def __init__(self, socket_path, stdin=subprocess.PIPE, **popen):
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             f"import sys; from vfio_impl.ivshmem.client import main; sys.exit(main(retry_interval={RETRY}))",
             "-S", socket_path], env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
        self.unread = {self.proc.stdout: b"", self.proc.stderr: b""}

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, text, timeout=5.0, stream="stdout"):
        """What came before `text` on `stream`, consumed up to the end of `text`."""
        pipe = getattr(self.proc, stream)
        deadline = time.monotonic() + timeout
        while text.encode() not in self.unread[pipe]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} not in {self.unread[pipe]!r}"
            if select.select([pipe], [], [], remaining)[0]:
                chunk = os.read(pipe.fileno(), 4096)
                assert chunk, f"{text!r} not in {self.unread[pipe]!r} at its end"
                self.unread[pipe] += chunk
        before, _, self.unread[pipe] = self.unread[pipe].partition(text.encode())
        return before.decode()

    def dump(self):
        """What `dump` prints, once the client is connected and reads commands."""
        self.send("dump\nhelp\n")
        return self.expect(HELP)

    def stop(self, signum=signal.SIGTERM):
        """Its exit status, and what it wrote to stderr that no expect() took."""
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=5)
        return code, (self.unread[self.proc.stderr] + self.proc.stderr.read()).decode()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def test_cli_driven_by_a_pipe(server, client):
    b = client()
    cli = Cli(server.socket_path)
    try:
        cli.expect(f"connected to server at {server.socket_path}, our_id = 1\n")
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
        cli.proc.stdin.close()
        assert b.wait_interrupt(2) == 1, "a last command with no newline still runs"
        assert cli.stop() == (0, "")
    finally:
        cli.close()
    until(lambda: b.peers == {}, b)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_cli_listens_on_after_stdin_ends_until_a_signal_stops_it_quietly(server, client, signum, status):
    """`ivshmem-client </dev/null &` is a background listener; Ctrl-C or kill ends it with no traceback."""
    b = client()
    cli = Cli(server.socket_path, stdin=subprocess.DEVNULL)
    try:
        cli.expect("our_id = 1\n")
        until(lambda: b.peers.get(1) == 2, b)
        for vector in (0, 1):
            b.notify(1, vector)
            cli.expect(f"receive notification from peer_id=1 vector={vector}\n")
        assert cli.stop(signum) == (status, "")
    finally:
        cli.close()
    until(lambda: b.peers == {}, b)


def test_a_background_job_of_a_script_outlives_its_ctrl_c(server, client):
    """A shell with no job control starts `cmd &` with SIGINT ignored; the client leaves it so."""
    b = client()
    cli = Cli(server.socket_path, stdin=subprocess.DEVNULL,
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        cli.expect("our_id = 1\n")
        until(lambda: 1 in b.peers, b)
        cli.proc.send_signal(signal.SIGINT)
        b.notify(1, 0)
        cli.expect("receive notification from peer_id=1 vector=0\n")
        assert cli.stop() == (0, "")
    finally:
        cli.close()


def test_cli_waits_for_the_server_and_reconnects_when_it_restarts(tmp_path):
    """QEMU's client loop: retry until the server answers, and after it hangs up start over
    with no peers, as a new peer of the next server."""
    path = str(tmp_path / "sock")
    cli = Cli(path)
    retry = f"cannot connect to server at {path}: No such file or directory; retry in {RETRY} seconds\n"
    try:
        for _ in range(2):
            cli.expect(retry, stream="stderr")
        with IvshmemServer(path), IvshmemClient(path, vectors=1) as b:
            deadline = time.monotonic() + 5
            while f"peer_id = {b.own_id}\n" not in cli.dump():
                assert time.monotonic() < deadline
        cli.expect("disconnected from server\n")
        with IvshmemServer(path):
            cli.expect(f"connected to server at {path}, our_id = 0\n")
            dump = cli.dump()
            assert dump.startswith("our_id = 0\n") and "peer_id" not in dump, "the first server's peers are gone"
        cli.expect("disconnected from server\n")
        code, err = cli.stop(signal.SIGINT)
    finally:
        cli.close()
    assert code == 130
    # A connect racing the server's shutdown may be refused or reset rather than find no file.
    retrying = re.compile(rf"cannot connect to server at {re.escape(path)}: [^;]+; retry in {RETRY} seconds")
    assert all(retrying.fullmatch(line) for line in err.splitlines()), "Ctrl-C while retrying is quiet too"


def test_main_closes_its_fds_when_a_signal_stops_it(server):
    baseline = open_fds()

    def connected_then_sigint():
        deadline = time.monotonic() + 5
        while not server.peer_ids() and time.monotonic() < deadline:
            time.sleep(0.002)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    helper = threading.Thread(target=connected_then_sigint)
    helper.start()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert main(["-S", server.socket_path], retry_interval=RETRY) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main()")
    helper.join()
    assert signal.getsignal(signal.SIGINT) is sigint
    deadline = time.monotonic() + 2
    while (server.peer_ids() or open_fds() != baseline) and time.monotonic() < deadline:
        time.sleep(0.001)   # the server thread closes its side of the peer after dropping it
    assert open_fds() == baseline
