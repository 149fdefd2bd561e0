"""ivshmem-server: QEMU's contrib/ivshmem-server, wire-compatible, as a library and a console script.

The bookkeeping is uapi.ivshmem.ServerProtocol; this module only moves its
messages over AF_UNIX sockets. It never blocks on a peer: every send is
non-blocking and what a peer cannot take yet waits in that peer's queue. A
peer whose oldest queued message has waited `send_timeout` seconds is dropped
as if it had left, so a reader that stalls, or reads slower than it is
written to, costs the others at most that long and a bounded queue.
"""

from __future__ import annotations

import _posixshmem
import argparse
import array
import collections
import contextlib
import errno
import os
import re
import resource
import selectors
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

from vfio_impl.core.trace import trace
from vfio_impl.ivshmem.protocol import MAX_VECTORS, MESSAGE_SIZE, ProtocolError, ServerProtocol, encode

DEFAULT_SOCKET_PATH = "/tmp/ivshmem_socket"
DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_PID_FILE = "/var/run/ivshmem-server.pid"
DEFAULT_SIZE = 4 << 20
SEND_TIMEOUT = 10.0
DOORBELL_SHM_SIZE = 1 << 20  # what ci/real-vm.sh gives the server of its ivshmem-doorbell (-l 1M)
MAX_HUGEPAGE_SIZE = 1 << 30
ACCEPTS_PER_POLL = 64
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_NOT_NOW = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM)
_NO_FDS = (errno.EMFILE, errno.ENFILE)


def pow2ceil(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


@dataclass(eq=False)
class _Peer:
    id: int
    sock: socket.socket
    vectors: list[int]
    backlog: collections.deque = field(default_factory=collections.deque)
    doomed: bool = False


class IvshmemServer:
    """One shared memory, one listening socket, and the peers connected to it.

    With neither `shm_name` nor `shm_dir` the memory is an anonymous memfd, so
    nothing is left on the filesystem and parallel servers never collide.
    """

    def __init__(self, socket_path: str, *, shm_name: str | None = None, shm_dir: str | None = None,
                 size: int = DEFAULT_SIZE, vectors: int = 1, verbose: bool = False,
                 send_timeout: float = SEND_TIMEOUT) -> None:
        if shm_name is not None and shm_dir is not None:
            raise ValueError("give shm_name or shm_dir, not both")
        if not 0 <= vectors <= MAX_VECTORS:
            raise ValueError(f"too many requested vectors (max is {MAX_VECTORS})")
        self.socket_path = os.fspath(socket_path)
        self.shm_name = shm_name
        self.shm_dir = shm_dir
        self.size = pow2ceil(size)
        self.vectors = vectors
        self.verbose = verbose
        self.send_timeout = send_timeout
        self.shm_fd = -1
        self._shm_created = False
        self._listener: socket.socket | None = None
        self._socket_inode = None
        self._selector: selectors.BaseSelector | None = None
        self._waker = -1
        self._spare_fd = -1
        self.protocol = ServerProtocol()
        self._peers: dict[int, _Peer] = {}
        self._doomed: collections.deque[_Peer] = collections.deque()
        self._backlogged: set[_Peer] = set()
        self._lent: collections.Counter[int] = collections.Counter()
        self._orphans: set[int] = set()
        self._lock = threading.Lock()
        self._quit = False
        self._thread: threading.Thread | None = None

    def _debug(self, message: str, **fields) -> None:
        trace("ivshmem_server", message=message, **fields)
        if self.verbose:
            print(message, flush=True)

    # start and stop

    def start(self) -> None:
        """Opens the shm and listens; returns once the socket path is connectable."""
        self._quit = False
        try:
            self._open_shm()
            self._listen()
            self._selector = selectors.DefaultSelector()
            self._waker = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            self._selector.register(self._waker, selectors.EVENT_READ, "waker")
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        except BaseException:
            self.stop()
            raise

    def _open_shm(self) -> None:
        if self.shm_dir is not None:
            self._debug(f"Using file-backed shared memory: {self.shm_dir}")
            fd, path = tempfile.mkstemp(prefix="ivshmem.", dir=self.shm_dir)
            os.unlink(path)
        elif self.shm_name is not None:
            self._debug(f"Using POSIX shared memory: {self.shm_name}")
            try:
                fd = _posixshmem.shm_open(self.shm_name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o700)
                self._shm_created = True
            except FileExistsError:
                fd = _posixshmem.shm_open(self.shm_name, os.O_RDWR, 0o700)
        else:
            fd = os.memfd_create("ivshmem", os.MFD_CLOEXEC)
        self.shm_fd = fd
        self._ftruncate()

    def _ftruncate(self) -> None:
        """Tries larger powers of two up to 1 GiB, for hugetlbfs, as QEMU's server does."""
        if os.fstat(self.shm_fd).st_size == self.size:
            return
        size = self.size
        while True:
            try:
                os.ftruncate(self.shm_fd, size)
                self.size = size
                return
            except OSError:
                size *= 2
                if size > MAX_HUGEPAGE_SIZE:
                    raise

    def _listen(self) -> None:
        """Binds a temporary name, listens, then links it into place: the path appears only when ready.

        A link, not a rename, so a path already taken (another server's live
        socket) fails as QEMU's bind() does instead of being replaced.
        """
        self._debug(f"create & bind socket {self.socket_path}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        temporary = f"{self.socket_path}~{os.getpid()}"
        if len(os.fsencode(temporary)) >= 108:
            temporary = self.socket_path
        elif os.path.lexists(temporary):
            os.unlink(temporary)
        try:
            self._listener.bind(temporary)
            try:
                self._listener.listen(socket.SOMAXCONN)
                if temporary != self.socket_path:
                    os.link(temporary, self.socket_path)
            finally:
                if temporary != self.socket_path:
                    os.unlink(temporary)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.EADDRINUSE):
                raise
            raise FileExistsError(errno.EEXIST, _why_taken(self.socket_path), self.socket_path) from None
        self._socket_inode = os.stat(self.socket_path).st_ino

    def stop(self) -> None:
        """Closes every peer and fd, and removes the socket and the shm this server created.

        Peers see the connection end, not each other leave: with N peers that
        would be N*N messages nobody acts on. Whoever runs serve_forever() in a
        thread of their own calls shutdown() and waits for it to return first.
        """
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            for peer in list(self._peers.values()):
                self._close_peer(peer)
            self.protocol.peers.clear()
            self._doomed.clear()
            if self._selector is not None:
                self._selector.close()
                self._selector = None
            if self._listener is not None:
                if self._socket_inode is not None and _inode(self.socket_path) == self._socket_inode:
                    os.unlink(self.socket_path)
                self._socket_inode = None
                self._listener.close()
                self._listener = None
            for fd in (self.shm_fd, self._waker, self._spare_fd, *self._orphans):
                if fd >= 0:
                    os.close(fd)
            self.shm_fd = self._waker = self._spare_fd = -1
            self._orphans.clear()
            self._lent.clear()
            if self._shm_created:
                _posixshmem.shm_unlink(self.shm_name)
                self._shm_created = False

    def shutdown(self) -> None:
        """Asks serve_forever() to return; safe from another thread or a signal handler."""
        self._quit = True
        if self._waker >= 0:
            os.eventfd_write(self._waker, 1)

    def __enter__(self) -> IvshmemServer:
        self.start()
        self._thread = threading.Thread(target=self.serve_forever, name="ivshmem-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # the loop

    def serve_forever(self) -> None:
        while not self._quit:
            self.poll(None)

    def poll(self, timeout: float | None = None) -> None:
        """Waits up to `timeout` for events and handles what is pending, once."""
        deadline = self._next_deadline()
        if deadline is not None:
            wait = max(0.0, deadline - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        events = self._selector.select(timeout)
        with self._lock:
            for key, mask in events:
                if key.data == "waker":
                    os.eventfd_read(self._waker)
                elif key.data == "listener":
                    self._accept()
                elif mask & selectors.EVENT_READ:
                    self._doom(key.data, "peer sent data or hung up")
                elif not key.data.doomed:
                    self._flush(key.data)
                self._reap()
            self._drop_stalled()

    def peer_ids(self) -> list[int]:
        """The ids in use, in the order the peers joined."""
        with self._lock:
            return list(self.protocol.peers)

    # new peers

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_POLL):
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in _NO_FDS:
                    self._debug(f"cannot accept() {e.strerror}")
                    return
                self._shed_connection()
                continue
            self._handle_new_conn(conn)
            self._reap()

    def _shed_connection(self) -> None:
        """Out of fds: accept on the spare one and close at once, so the client is not left hanging."""
        self._debug("cannot accept(): out of file descriptors, connection refused")
        os.close(self._spare_fd)
        try:
            self._listener.accept()[0].close()
        except OSError:
            pass
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _handle_new_conn(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._debug(f"accept()={conn.fileno()}")
        vectors: list[int] = []
        try:
            with contextlib.ExitStack() as unwind:
                unwind.callback(conn.close)
                self._selector.register(conn, selectors.EVENT_READ)
                unwind.callback(self._selector.unregister, conn)
                for _ in range(self.vectors):
                    vectors.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                    unwind.callback(os.close, vectors[-1])
                peer_id, messages = self.protocol.join(vectors, self.shm_fd)
                unwind.pop_all()
        except (OSError, ProtocolError) as e:
            self._debug(f"cannot set up new peer: {e}")
            return
        peer = self._peers[peer_id] = _Peer(peer_id, conn, vectors)
        self._selector.modify(conn, selectors.EVENT_READ, peer)
        self._debug(f"new peer id = {peer_id}", peer=peer_id)
        for message in messages:
            self._send(self._peers[message.to], message.value, message.fd)

    # sending

    def _send(self, peer: _Peer, value: int, fd: int) -> None:
        if peer.doomed:
            return
        if fd >= 0:
            self._lent[fd] += 1
        peer.backlog.append((value, fd, time.monotonic()))
        if len(peer.backlog) == 1:
            self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        backlog = peer.backlog
        while backlog:
            value, fd, _ = backlog[0]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
            try:
                sent = peer.sock.sendmsg([encode(value)], rights, _SEND_FLAGS)
            except OSError as e:
                if e.errno in _NOT_NOW:
                    self._wait_writable(peer)
                else:
                    self._doom(peer, f"cannot send: {e.strerror}")
                return
            if sent != MESSAGE_SIZE:
                self._doom(peer, f"short send of {sent} bytes")
                return
            backlog.popleft()
            self._release(fd)
        if peer in self._backlogged:
            self._backlogged.discard(peer)
            self._selector.modify(peer.sock, selectors.EVENT_READ, peer)

    def _wait_writable(self, peer: _Peer) -> None:
        if peer not in self._backlogged:
            self._backlogged.add(peer)
            self._selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)

    def _release(self, fd: int) -> None:
        if fd < 0:
            return
        self._lent[fd] -= 1
        if not self._lent[fd]:
            del self._lent[fd]
            if fd in self._orphans:
                self._orphans.remove(fd)
                os.close(fd)

    def _next_deadline(self) -> float | None:
        oldest = [peer.backlog[0][2] for peer in self._backlogged if peer.backlog]
        return min(oldest) + self.send_timeout if oldest else None

    def _drop_stalled(self) -> None:
        now = time.monotonic()
        for peer in list(self._backlogged):
            if peer.backlog and now - peer.backlog[0][2] >= self.send_timeout:
                self._doom(peer, f"peer {peer.id} took nothing for {self.send_timeout} s")
        self._reap()

    # leaving peers

    def _doom(self, peer: _Peer, reason: str) -> None:
        """Marks a peer to be freed; freeing sends messages, so it waits for _reap()."""
        if not peer.doomed:
            peer.doomed = True
            self._debug(reason, peer=peer.id)
            self._doomed.append(peer)

    def _reap(self) -> None:
        while self._doomed:
            self._free_peer(self._doomed.popleft())

    def _free_peer(self, peer: _Peer) -> None:
        """QEMU's ivshmem_server_free_peer: close it, then tell everyone else."""
        self._close_peer(peer)
        for message in self.protocol.leave(peer.id):
            self._send(self._peers[message.to], message.value, message.fd)

    def _close_peer(self, peer: _Peer) -> None:
        self._debug(f"free peer {peer.id}", peer=peer.id)
        self._selector.unregister(peer.sock)
        peer.sock.close()
        self._backlogged.discard(peer)
        while peer.backlog:
            self._release(peer.backlog.popleft()[1])
        del self._peers[peer.id]
        for fd in peer.vectors:
            if fd in self._lent:
                self._orphans.add(fd)
            else:
                os.close(fd)


@contextlib.contextmanager
def doorbell_servers(topology):
    """A fake kernel's topology with a server for each ivshmem-doorbell that names none, as the CI
    VM's host starts one before QEMU: 1 MiB, the device's vectors, a socket in a temporary
    directory, all stopped on exit. The topology given is left as it was; a copy names the sockets."""
    with contextlib.ExitStack() as servers:
        devices = []
        for spec in topology.devices:
            if spec.model == "ivshmem-doorbell" and "chardev" not in spec.options:
                path = os.path.join(servers.enter_context(tempfile.TemporaryDirectory(prefix="ivshmem-")), "socket")
                servers.enter_context(IvshmemServer(path, size=DOORBELL_SHM_SIZE, vectors=spec.options.get("vectors", 1)))
                spec = replace(spec, options={**spec.options, "chardev": path})
            devices.append(spec)
        yield replace(topology, devices=devices)

def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _why_taken(path: str) -> str:
    """Whose the socket path looks like, asked without disturbing a live server: a datagram
    connect() to a stream socket fails (EPROTOTYPE) before it reaches the accept queue, and one
    to a socket that nobody holds any more is refused."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return "the path exists and is not a socket; remove it or choose another socket path"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(path)
    except ConnectionRefusedError:
        return "the path exists but nothing listens on it (a stale socket?); remove it and start again"
    except OSError as e:
        if e.errno != errno.EPROTOTYPE:
            return "the path exists; is another ivshmem-server running? If not, remove it"
    return ("the path exists and a process listens on it; is another ivshmem-server running? "
            "Stop it or choose another socket path")


# the console script

_SIZE = re.compile(r"(\d+)(?:\.(\d+))?([bkmgtpe]?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """QEMU's parse_option_size: bytes, or a K/M/G/T/P/E suffix (powers of 1024)."""
    match = _SIZE.fullmatch(text)
    if match is None or (match[2] and match[3] in ("", "b", "B")):
        raise ValueError("Parameter 'shm_size' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                         "and exabytes, respectively.")
    unit = 1 << (10 * "BKMGTPE".index((match[3] or "B").upper()))
    whole = int(match[1]) * unit
    if match[2]:
        whole += int(match[2]) * unit // 10 ** len(match[2])
    if whole >= 1 << 64:
        raise ValueError(f"Value '{text}' is out of range for parameter 'shm_size'")
    return whole


USAGE = f"""\
Usage: %(prog)s [OPTION]...
  -h: show this help
  -v: verbose mode
  -F: foreground mode (default is to daemonize)
  -p <pid-file>: path to the PID file (written in daemon mode, or when given)
     default {DEFAULT_PID_FILE}
  -S <unix-socket-path>: path to the unix socket to listen to
     default {DEFAULT_SOCKET_PATH}
  -M <shm-name>: POSIX shared memory object to use
     default {DEFAULT_SHM_NAME}
  -m <dir-name>: where to create shared memory
  -l <size>: size of shared memory in bytes
     suffixes K, M and G can be used, e.g. 1K means 1024
     default {DEFAULT_SIZE}
  -n <nvectors>: number of vectors
     default 1
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(message)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="ivshmem-server", add_help=False)
    parser.add_argument("-h", action="store_true", dest="help")
    parser.add_argument("-v", action="store_true", dest="verbose")
    parser.add_argument("-F", action="store_true", dest="foreground")
    parser.add_argument("-p", dest="pid_file")
    parser.add_argument("-S", dest="socket_path", default=DEFAULT_SOCKET_PATH)
    parser.add_argument("-M", dest="shm", type=lambda name: ("M", name), default=("M", DEFAULT_SHM_NAME))
    parser.add_argument("-m", dest="shm", type=lambda path: ("m", path))
    parser.add_argument("-l", dest="size", default=str(DEFAULT_SIZE))
    parser.add_argument("-n", dest="vectors", default="1")
    args = parser.parse_args(argv)
    if args.help:
        return args
    try:
        args.size = parse_size(args.size)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    try:
        args.vectors = int(args.vectors, 0)
        if args.vectors < 0:
            raise ValueError
    except ValueError:
        raise _UsageError("cannot parse n_vectors") from None
    if args.vectors > MAX_VECTORS:
        raise _UsageError(f"too many requested vectors (max is {MAX_VECTORS})")
    if args.verbose and not args.foreground:
        raise _UsageError("cannot use verbose in daemon mode")
    return args


def _raise_nofile_limit() -> None:
    """Each peer costs 1 + vectors fds, so take every fd the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        print("Try 'ivshmem-server -h' for more information.", file=sys.stderr)
        return 1
    if args.help:
        print(USAGE % {"prog": "ivshmem-server"}, end="")
        return 0
    kind, shm = args.shm
    server = IvshmemServer(args.socket_path, shm_name=shm if kind == "M" else None,
                           shm_dir=shm if kind == "m" else None, size=args.size,
                           vectors=args.vectors, verbose=args.verbose)
    _raise_nofile_limit()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, lambda *_: server.shutdown())
    pid_file = None
    try:
        try:
            server.start()
        except OSError as e:
            reason = e.strerror if e.filename == server.socket_path else e
            print(f"cannot start server on {args.socket_path}: {reason}", file=sys.stderr)
            return 1
        if not args.foreground:
            _daemonize()
        if args.pid_file or not args.foreground:
            try:
                pid_file = _write_pid_file(args.pid_file or DEFAULT_PID_FILE)
            except OSError as e:
                print(f"cannot write pid file: {e.strerror}", file=sys.stderr)
                return 1
        server.serve_forever()
        return 0
    finally:
        server.stop()
        if pid_file:
            os.unlink(pid_file)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _write_pid_file(path: str) -> str:
    """Written aside and renamed, so a pid file that exists is complete."""
    temporary = f"{path}~{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(temporary, path)
    return path


def _daemonize() -> None:
    """daemon(3) as QEMU calls it: keep the directory and stdio, leave the session."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os._exit(0)
    os.setsid()


if __name__ == "__main__":
    sys.exit(main())
