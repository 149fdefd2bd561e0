"""ivshmem-server over real sockets: the exact sequence raw peers see, ids, drops, cleanup, the CLI."""

import _posixshmem
import contextlib
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from vfio_impl.core.trace import TraceRecorder
from vfio_impl.ivshmem import server as ivshmem_server
from vfio_impl.ivshmem.client import recv_chunk
from vfio_impl.ivshmem.protocol import Reassembler
from vfio_impl.ivshmem.server import IvshmemServer, main, parse_size

REPO = Path(__file__).resolve().parents[1]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def readable(sock, timeout):
    return bool(select.select([sock], [], [], timeout)[0])


class RawPeer:
    """A peer that is only a socket: what it receives, exactly, and nothing sent."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.reassembler = Reassembler()
        self.fds = []
        self.unread = []
        self.eof = False

    def read(self, server, count, timeout=2.0):
        """The next `count` messages (fewer at EOF or timeout), polling the server when it is not threaded."""
        deadline = time.monotonic() + timeout
        while len(self.unread) < count and time.monotonic() < deadline:
            if server is not None:
                server.poll(0)
            if readable(self.sock, 0.01 if server is not None else deadline - time.monotonic()):
                try:
                    data, fds = recv_chunk(self.sock)
                except ConnectionResetError:
                    data, fds = b"", []
                if not data:
                    self.eof = True
                    break
                received = self.reassembler.feed(data, fds)
                self.fds += [fd for _, fd in received if fd >= 0]
                self.unread += received
        messages, self.unread = self.unread[:count], self.unread[count:]
        return messages

    def silent(self, server, timeout=0.05):
        """Nothing more arrives (and no EOF) within `timeout`."""
        if server is not None:
            server.poll(timeout)
        return not self.unread and not readable(self.sock, 0 if server is not None else timeout)

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.reassembler.close()
        self.sock.close()


def shape(messages):
    """Values, and whether an fd came with each."""
    return [(value, fd >= 0) for value, fd in messages]


def same_file(a, b):
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(**kwargs):
        kwargs.setdefault("shm_dir", str(tmp_path))
        server = IvshmemServer(str(tmp_path / "sock"), **kwargs)
        server.start()
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def peers():
    made = []

    def connect(server):
        peer = RawPeer(server.socket_path)
        made.append(peer)
        return peer
    yield connect
    for peer in made:
        peer.close()


def setup_of(own_id, others=(), vectors=1):
    return ([(0, False), (own_id, False), (-1, True)]
            + [(other, True) for other in others for _ in range(vectors)]
            + [(own_id, True)] * vectors)


# the protocol on the wire

def test_join_sequence_both_ways(make_server, peers):
    server = make_server(vectors=2)
    a = peers(server)
    got_a = a.read(server, 5)
    assert shape(got_a) == setup_of(0, vectors=2)
    b = peers(server)
    got_b = b.read(server, 7)
    assert shape(got_b) == setup_of(1, [0], vectors=2)
    news = a.read(server, 2)
    assert shape(news) == [(1, True), (1, True)]
    assert a.silent(server) and b.silent(server)
    assert server.peer_ids() == [0, 1]
    assert same_file(got_a[2][1], got_b[2][1]), "one shared memory"
    for vector in range(2):
        assert same_file(got_b[3 + vector][1], got_a[3 + vector][1]), "b holds a's own eventfds"
        assert same_file(news[vector][1], got_b[5 + vector][1]), "a holds b's own eventfds"


def test_a_third_peer_hears_of_both_in_join_order(make_server, peers):
    server = make_server()
    a, b = peers(server), peers(server)
    a.read(server, 4)
    b.read(server, 5)
    c = peers(server)
    assert shape(c.read(server, 6)) == setup_of(2, [0, 1])
    assert shape(a.read(server, 2)) == [(1, True), (2, True)]
    assert shape(b.read(server, 1)) == [(2, True)]


def test_an_eventfd_rung_by_one_peer_fires_at_the_other(make_server, peers):
    server = make_server()
    a, b = peers(server), peers(server)
    own_a = a.read(server, 4)[3][1]
    b_view_of_a = b.read(server, 5)[3][1]
    os.eventfd_write(b_view_of_a, 1)
    assert os.eventfd_read(own_a) == 1


def test_eventfds_are_nonblocking_as_qemu_makes_them(make_server, peers):
    server = make_server()
    own = peers(server).read(server, 4)[3][1]
    with pytest.raises(BlockingIOError):
        os.eventfd_read(own)


def test_leave_is_the_id_with_no_fd(make_server, peers):
    server = make_server()
    a, b, c = peers(server), peers(server), peers(server)
    a.read(server, 6)
    b.read(server, 6)
    c.read(server, 6)
    b.sock.close()
    assert a.read(server, 1) == [(1, -1)]
    assert c.read(server, 1) == [(1, -1)]
    assert server.peer_ids() == [0, 2]
    assert a.silent(server) and c.silent(server)


def test_zero_vectors(make_server, peers):
    server = make_server(vectors=0)
    a, b = peers(server), peers(server)
    assert shape(a.read(server, 3)) == setup_of(0, vectors=0)
    assert shape(b.read(server, 3)) == setup_of(1, [0], vectors=0)
    assert a.silent(server)


# ids

def test_ids_roll_on_past_one_just_freed(make_server, peers):
    server = make_server()
    first = [peers(server) for _ in range(3)]
    server.poll(0.1)
    first[1].sock.close()
    server.poll(0.1)
    assert server.peer_ids() == [0, 2]
    peers(server)
    server.poll(0.1)
    assert server.peer_ids() == [0, 2, 3]


def test_ids_wrap_at_uint16_and_skip_those_in_use(make_server, peers):
    server = make_server()
    a, b = peers(server), peers(server)
    a.read(server, 4)
    b.read(server, 5)
    server.protocol.cur_id = 0xFFFF
    last, wrapped = peers(server), peers(server)
    assert last.read(server, 2)[1] == (0xFFFF, -1)
    assert wrapped.read(server, 2)[1] == (2, -1)
    assert server.peer_ids() == [0, 1, 0xFFFF, 2]


# drops and deaths

def test_a_peer_that_sends_anything_is_dropped(make_server, peers):
    server = make_server()
    a, b = peers(server), peers(server)
    a.read(server, 5)
    b.read(server, 5)
    b.sock.send(b"x")
    assert a.read(server, 1) == [(1, -1)]
    assert b.read(server, 1) == [] and b.eof
    assert server.peer_ids() == [0]


def test_a_peer_that_cannot_be_sent_to_is_dropped(make_server, peers):
    server = make_server()
    a, b = peers(server), peers(server)
    a.read(server, 5)
    b.read(server, 5)
    b.sock.shutdown(socket.SHUT_RD)
    with TraceRecorder() as trace:
        c = peers(server)
        assert shape(c.read(server, 7)) == [*setup_of(2, [0, 1]), (1, False)], "b joined, then left"
    assert shape(a.read(server, 2)) == [(2, True), (1, False)]
    reasons = [f["message"] for f in trace.named("ivshmem_server")]
    assert "cannot send: Broken pipe" in reasons
    assert server.peer_ids() == [0, 2]


def test_clients_dying_at_every_step_of_the_handshake(make_server, peers):
    server = make_server(vectors=3)
    baseline = open_fds()
    survivor = RawPeer(server.socket_path)
    survivor.read(server, 6)
    for read_first in range(7):
        victim = RawPeer(server.socket_path)
        victim.read(server, read_first)
        victim.close()
        server.poll(0.01)
    news = survivor.read(server, 7 * 4)
    assert shape(news) == [(victim, flag) for victim in range(1, 8) for flag in (True,) * 3 + (False,)]
    survivor.close()
    while server.peer_ids():
        server.poll(0.01)
    assert open_fds() == baseline


def test_dying_before_being_accepted(make_server, peers):
    server = make_server()
    for _ in range(5):
        RawPeer(server.socket_path).sock.close()
    a = peers(server)
    assert shape(a.read(server, 4))[1] == (5, False)
    assert a.silent(server)
    assert server.peer_ids() == [5]


def test_a_stalled_reader_is_dropped_and_does_not_stall_the_others(make_server, peers):
    server = make_server(vectors=64, send_timeout=0.3)
    peers(server)  # connects, and never reads
    reader = peers(server)
    reader.read(server, 3 + 64 * 2)
    started = time.monotonic()
    got = []
    while 0 in server.peer_ids():
        assert time.monotonic() - started < 3
        RawPeer(server.socket_path).sock.close()
        got += reader.read(server, 65, timeout=0.05)
    assert time.monotonic() - started >= 0.3
    got += reader.read(server, 65, timeout=0.05)
    assert (0, -1) in got and server.peer_ids() == [1]
    assert len(got) >= 5 * 65, "the others kept hearing news while one peer stalled"


def test_sigpipe_never_kills_the_server(make_server, peers):
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        server = make_server()
        a = peers(server)
        a.sock.close()
        server.poll(0.05)
        b = peers(server)
        assert shape(b.read(server, 4))[1] == (1, False)
    finally:
        signal.signal(signal.SIGPIPE, previous)


# start, stop, cleanup

def test_the_socket_path_appears_ready(tmp_path):
    server = IvshmemServer(str(tmp_path / "sock"))
    server.start()
    try:
        assert os.listdir(tmp_path) == ["sock"], "no temporary name left behind"
        peer = RawPeer(tmp_path / "sock")
        assert shape(peer.read(server, 4)) == setup_of(0)
        peer.close()
    finally:
        server.stop()
    assert os.listdir(tmp_path) == []


def test_a_second_server_on_the_same_path_fails_and_leaves_the_first_alone(make_server, peers):
    server = make_server()
    other = IvshmemServer(server.socket_path)
    with pytest.raises(FileExistsError, match="a process listens on it") as error:
        other.start()
    assert error.value.filename == server.socket_path
    assert os.path.exists(server.socket_path)
    assert shape(peers(server).read(server, 4)) == setup_of(0), "finding out cost the first server no peer id"


def a_stale_socket(path, _):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))


def a_file(path, _):
    path.write_text("")


def a_listener(path, cleanup):
    listener = cleanup.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    listener.bind(str(path))
    listener.listen()


STALE = "the path exists but nothing listens on it (a stale socket?); remove it and start again"


@pytest.mark.parametrize("leave, longest, advice", [
    (a_stale_socket, False, STALE),
    (a_stale_socket, True, STALE),
    (a_file, False, "the path exists and is not a socket; remove it or choose another socket path"),
    (a_listener, False, "the path exists and a process listens on it; is another ivshmem-server running? "
                        "Stop it or choose another socket path"),
], ids=["stale", "stale, too long for a temporary name", "not a socket", "live"])
def test_main_says_what_to_do_about_a_socket_path_that_exists(tmp_path, capsys, leave, longest, advice):
    """One line on the user's path (never the temporary `path~PID` bound first) that says how to go on."""
    # 107 bytes is the longest path sun_path holds; the server binds it directly, with no `~PID`.
    path = tmp_path / ("x" * (107 - len(str(tmp_path)) - 1) if longest else "sock")
    with contextlib.ExitStack() as cleanup:
        leave(path, cleanup)
        assert main(["-F", "-S", str(path), "-m", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"cannot start server on {path}: {advice}\n"
    assert os.listdir(tmp_path) == [path.name]


def test_file_backed_shm_is_unlinked_at_once(tmp_path, peers):
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    with IvshmemServer(str(tmp_path / "sock"), shm_dir=str(shm_dir), size=3000) as server:
        assert os.listdir(shm_dir) == []
        shm = peers(server).read(None, 3)[2][1]
        assert os.fstat(shm).st_size == 4096, "rounded up to a power of two"


def test_posix_shm_is_created_and_removed(tmp_path, peers):
    name = f"ivshmem-test-{uuid.uuid4().hex}"
    server = IvshmemServer(str(tmp_path / "sock"), shm_name=name, size=1 << 16)
    server.start()
    try:
        assert os.path.exists(f"/dev/shm/{name}")
        assert os.stat(f"/dev/shm/{name}").st_size == 1 << 16
    finally:
        server.stop()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_an_existing_posix_shm_is_used_and_left(tmp_path, peers):
    name = f"ivshmem-test-{uuid.uuid4().hex}"
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"kept")
        with IvshmemServer(str(tmp_path / "sock"), shm_name=name, size=4096) as server:
            shm = peers(server).read(None, 3)[2][1]
            assert os.pread(shm, 4, 0) == b"kept"
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        os.close(fd)
        _posixshmem.shm_unlink(name)


def test_stop_releases_every_fd(tmp_path):
    baseline = open_fds()
    with IvshmemServer(str(tmp_path / "sock"), vectors=4) as server:
        connected = [RawPeer(server.socket_path) for _ in range(3)]
        for peer in connected:
            peer.read(None, 3)
        deadline = time.monotonic() + 2
        while len(server.peer_ids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
    for peer in connected:
        peer.read(None, 100, timeout=1)
        assert peer.eof, "the server hung up"
        peer.close()
    assert open_fds() == baseline
    assert os.listdir(tmp_path) == []


def test_one_thousand_peers_join_and_leave_without_leaking_fds(make_server):
    """Batches of 25 raw peers join, read and close what they get, then leave."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = make_server(vectors=1)
    baseline = open_fds()
    ids = []
    for _ in range(1000 // 25):
        batch = [RawPeer(server.socket_path) for _ in range(25)]
        for peer in batch:
            ids.append(peer.read(server, 2)[1][0])
        for peer in batch:
            peer.close()
        while server.peer_ids():
            server.poll(0.01)
    assert ids == list(range(1000))
    assert open_fds() == baseline
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except ValueError:
        pass


# the console script

@pytest.mark.parametrize("text, size", [
    ("4096", 4096), ("1K", 1024), ("1k", 1024), ("2M", 2 << 20), ("1G", 1 << 30), ("1.5K", 1536),
    ("0", 0), ("3B", 3), ("1T", 1 << 40),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "1.5", "1.5B", "1KB", "-1", "1 M", "0x10", "16E"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("argv, message", [
    (["-n", "65"], "too many requested vectors (max is 64)"),
    (["-n", "two"], "cannot parse n_vectors"),
    (["-v"], "cannot use verbose in daemon mode"),
    (["-l", "lots"], "Parameter 'shm_size' expects a non-negative number below 2^64"),
    (["-x"], "unrecognized arguments"),
])
def test_main_rejects_bad_flags(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Try 'ivshmem-server -h' for more information." in err


def test_main_help(capsys):
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    for flag in ("-S", "-M", "-m", "-l", "-n", "-F", "-p", "-v"):
        assert f"  {flag}" in out


def test_main_fails_cleanly_when_it_cannot_start(tmp_path, capsys):
    assert main(["-F", "-S", str(tmp_path / "no" / "such" / "dir" / "sock"), "-m", str(tmp_path)]) == 1
    assert "cannot start server" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_main_serves_until_sigterm(tmp_path, capsys):
    sock = tmp_path / "sock"
    seen = []

    def peer_then_sigterm():
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        peer = RawPeer(sock)
        seen.extend(shape(peer.read(None, 5)))
        peer.close()
        os.kill(os.getpid(), signal.SIGTERM)
    helper = threading.Thread(target=peer_then_sigterm)
    helper.start()
    sigterm = signal.getsignal(signal.SIGTERM)
    argv = ["-F", "-v", "-S", str(sock), "-m", str(tmp_path), "-l", "64K", "-n", "2"]
    assert main(argv) == 0
    helper.join()
    assert seen == setup_of(0, vectors=2)
    assert "new peer id = 0" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is sigterm


def console_script(name):
    """The command pyproject.toml installs, or the same entry point run by this interpreter."""
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, function = entry.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def run_server(*flags, **popen):
    return subprocess.Popen([*console_script("ivshmem-server"), *flags], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, **popen)


def wait_for(path, proc=None, timeout=10):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and (proc is None or proc.poll() is None)
        time.sleep(0.005)


@contextlib.contextmanager
def foreground_server(sock, *flags, stop=signal.SIGTERM, **popen):
    """The console script with -F, ready on `sock`; `stop` at the end must stop it cleanly."""
    proc = run_server("-F", "-S", str(sock), *flags, **popen)
    try:
        wait_for(sock, proc)
        yield proc
        proc.send_signal(stop)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_console_script_in_the_foreground_with_a_pid_file(tmp_path):
    sock, pid_file = tmp_path / "sock", tmp_path / "pid"
    with foreground_server(sock, "-p", str(pid_file), "-m", str(tmp_path), "-l", "1M", "-n", "2") as proc:
        wait_for(pid_file, proc)
        assert pid_file.read_text() == f"{proc.pid}\n"
        peer = RawPeer(sock)
        got = peer.read(None, 5)
        assert shape(got) == setup_of(0, vectors=2)
        assert os.fstat(got[2][1]).st_size == 1 << 20
        peer.close()
    assert os.listdir(tmp_path) == []


def test_console_script_in_the_foreground_stops_quietly_on_ctrl_c(tmp_path):
    with foreground_server(tmp_path / "sock", "-m", str(tmp_path), stop=signal.SIGINT, stderr=subprocess.PIPE) as proc:
        pass
    with proc.stderr:
        assert proc.stderr.read() == b"", "no traceback"
    assert os.listdir(tmp_path) == []


def test_out_of_fds_it_sheds_newcomers_and_keeps_serving(tmp_path):
    """At its fd limit the server closes what it cannot serve at once, instead of leaving it hanging."""
    sock = tmp_path / "sock"
    crowd = []
    try:
        with foreground_server(sock, "-m", str(tmp_path),
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))):
            crowd = [RawPeer(sock) for _ in range(24)]
            served = [peer for peer in crowd if peer.read(None, 2, timeout=2)]
            shed = [peer for peer in crowd if peer not in served]
            assert served and shed and all(peer.eof for peer in shed)
            served[0].close()
            rest_of_setup, newcomers = 3, len(served) - 2
            assert served[1].read(None, rest_of_setup + newcomers + 1)[-1] == (0, -1)
            assert served[1].silent(None)
            crowd.append(RawPeer(sock))
            assert crowd[-1].read(None, 2)[1] == (len(served), -1), "ids went only to peers that were served"
    finally:
        for peer in crowd:
            peer.close()


def test_console_script_daemonizes_without_f(tmp_path):
    sock, pid_file = tmp_path / "sock", tmp_path / "pid"
    parent = run_server("-S", str(sock), "-p", str(pid_file), "-m", str(tmp_path), stderr=subprocess.DEVNULL)
    assert parent.wait(timeout=10) == 0
    assert sock.exists(), "the socket is ready when the parent returns"
    wait_for(pid_file)
    daemon = int(pid_file.read_text())
    assert os.getsid(daemon) == daemon
    os.kill(daemon, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while sock.exists() or pid_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_module_names_match_qemu_defaults():
    assert ivshmem_server.DEFAULT_SOCKET_PATH == "/tmp/ivshmem_socket"
    assert ivshmem_server.DEFAULT_SHM_NAME == "ivshmem"
    assert ivshmem_server.DEFAULT_SIZE == 4 << 20
