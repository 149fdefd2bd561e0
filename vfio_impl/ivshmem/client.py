"""ivshmem-client: QEMU's contrib/ivshmem-client, as a library and a console script.

A host-side peer of an ivshmem server: it maps the shared memory, rings other
peers' doorbells (their eventfds) and waits on its own. Message handling is
uapi.ivshmem.PeerProtocol, the same rules the device follows.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import mmap
import os
import re
import select
import signal
import socket
import sys
import time

from vfio_impl.ivshmem.protocol import (
    Event,
    OwnId,
    PeerGone,
    PeerProtocol,
    PeerVector,
    ProtocolError,
    Reassembler,
    Rejected,
    SharedMemory,
    Version,
)

DEFAULT_SOCKET_PATH = "/tmp/ivshmem_socket"
CONNECT_TIMEOUT = 5.0
RETRY_INTERVAL = 1.0
SETTLE_TIME = 0.5
QUIET_TIME = 0.02
READ_SIZE = 4096
READS_PER_POLL = 64
_FD_SIZE = array.array("i").itemsize


def recv_chunk(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One recvmsg() with room for a few fds, received close-on-exec; extra fds are the kernel's to drop."""
    data, ancillary, _, _ = sock.recvmsg(READ_SIZE, socket.CMSG_SPACE(4 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
    return data, list(fds)


def _ready(fds: list[int], timeout: float | None) -> set[int]:
    """poll(2), which unlike select() takes fds above 1023."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    wait = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return {fd for fd, _ in poller.poll(wait)}


class IvshmemClient:
    """A connection to an ivshmem server, as a peer like any guest's device.

    The protocol never says when the server is done advertising peers, but it
    sends our own eventfds after every other peer's. So connect() waits for
    `vectors` of our own (the server's -n, as the device's `vectors` property
    says it); without it, for the first one (or SETTLE_TIME when none comes)
    and then until the server has been quiet for QUIET_TIME.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET_PATH, *, vectors: int | None = None,
                 verbose: bool = False) -> None:
        self.socket_path = os.fspath(socket_path)
        self.verbose = verbose
        self.shm: mmap.mmap | None = None
        self._sock: socket.socket | None = None
        self._reassembler = Reassembler()
        self._protocol = PeerProtocol(vectors)
        self._events: list[Event] = []
        self._poll: select.poll | None = None
        self._polled: tuple[int, ...] = ()

    def _debug(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    # connection

    def connect(self, timeout: float | None = CONNECT_TIMEOUT) -> IvshmemClient:
        """Reads the setup (version, own id, shared memory, then our vectors) and maps the memory."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wanted = self._protocol.vectors
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.socket_path)
            self._sock.setblocking(False)
            self._read_until(lambda: self.shm is not None, deadline)
            if wanted is not None:
                self._read_until(lambda: self.vectors >= wanted, deadline)
            else:
                settled = time.monotonic() + SETTLE_TIME
                self._read_until(lambda: self.vectors > 0, settled if deadline is None else min(deadline, settled),
                                 required=False)
                while _ready([self._sock.fileno()], QUIET_TIME):
                    self._read_server(setup=True)
            self._read_server()
        except BaseException:
            self.close()
            raise
        self._events.clear()
        return self

    def _read_until(self, done, deadline: float | None, *, required: bool = True) -> None:
        while not done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0 or not _ready([self._sock.fileno()], remaining):
                if required:
                    raise TimeoutError(f"no setup from the ivshmem server at {self.socket_path}")
                return
            self._read_server(setup=True)

    def _read_server(self, *, setup: bool = False) -> None:
        for _ in range(READS_PER_POLL):
            try:
                data, fds = recv_chunk(self._sock)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("lost connection to server")
            messages = self._reassembler.feed(data, fds)
            for at, (value, fd) in enumerate(messages):
                try:
                    self._receive(value, fd, setup)
                except BaseException:
                    # A refused setup ends the read: the fds of the messages after it go too.
                    for _, later in messages[at + 1:]:
                        if later >= 0:
                            os.close(later)
                    raise

    def _receive(self, value: int, fd: int, setup: bool) -> None:
        event = self._protocol.receive(value, fd)
        if isinstance(event, SharedMemory):
            event = self._map(event.fd)
        if isinstance(event, Rejected) and setup:
            raise ProtocolError(event.reason)
        if self.verbose:
            self._debug(self._describe(event))
        self._events.append(event)

    def _describe(self, event: Event) -> str:
        """-v output: ids, vectors and fds in words, never a repr."""
        match event:
            case Version(version):
                return f"server protocol version {version}"
            case OwnId(peer):
                return f"our_id={peer}"
            case SharedMemory():
                return f"mapped {len(self.shm)} bytes of shared memory"
            case PeerVector(peer, 0, fd) if peer != self.own_id:
                return f"new peer id = {peer}\n  new vector 0 (fd={fd}) for peer id {peer}"
            case PeerVector(peer, vector, fd):
                return f"  new vector {vector} (fd={fd}) for peer id {peer}"
            case PeerGone(peer):
                return f"delete peer id = {peer}"
            case Rejected(_, reason):
                return reason

    def _map(self, fd: int) -> Event:
        try:
            if self.shm is not None:
                return Rejected(-1, "server sent unexpected shared memory message")
            if self.own_id < 0:
                return Rejected(-1, "server sent the shared memory before our id")
            self.shm = mmap.mmap(fd, os.fstat(fd).st_size)
            return SharedMemory(fd)
        except (OSError, ValueError) as e:
            return Rejected(-1, f"Failed to mmap shared memory {e}")
        finally:
            os.close(fd)

    def close(self) -> None:
        """Closes the socket and every eventfd, then unmaps (views of `shm` must be released first)."""
        self._protocol.close()
        self._reassembler.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    def __enter__(self) -> IvshmemClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # what we know

    @property
    def own_id(self) -> int:
        return self._protocol.own_id

    @property
    def vectors(self) -> int:
        """How many of our own eventfds (interrupt vectors) the server has given us."""
        return len(self._protocol.peers.get(self.own_id, ()))

    @property
    def peers(self) -> dict[int, int]:
        """Every other peer and how many vectors it has."""
        return {peer: len(fds) for peer, fds in self._protocol.peers.items() if peer != self.own_id}

    def fileno(self) -> int:
        return self._sock.fileno()

    def fds(self) -> list[int]:
        """What an outside event loop watches for us: the server socket, then our own eventfds."""
        return [self._sock.fileno(), *self._protocol.peers.get(self.own_id, ())]

    # events and interrupts

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Server messages since connect() or the last poll, waiting up to `timeout` for one."""
        if _ready([self._sock.fileno()], 0 if self._events else timeout):
            self._read_server()
        events, self._events = self._events, []
        return events

    def _poller(self, fds: tuple[int, ...]) -> select.poll:
        """One poll object for as long as the fds stay the same: building one per wait costs a
        doorbell round trip about a third of its time."""
        if fds != self._polled:
            self._poll = select.poll()
            for fd in fds:
                self._poll.register(fd, select.POLLIN)
            self._polled = fds
        return self._poll

    def wait_interrupt(self, timeout: float | None = None) -> int | None:
        """The vector of our own whose eventfd fired, or None when `timeout` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        sock = self._sock.fileno()
        while True:
            own = self._protocol.peers.get(self.own_id, [])
            ready = self._poller((sock, *own)).poll(wait)
            for fd, _ in ready:
                if fd != sock:
                    try:
                        os.eventfd_read(fd)
                        return own.index(fd)
                    except BlockingIOError:
                        continue
            if ready:
                self._read_server()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = int(left * 1000 + 0.999)

    def eventfds(self, peer: int) -> list[int]:
        """A peer's eventfds, one per vector: what its doorbells write, and what it reads."""
        try:
            return self._protocol.peers[peer]
        except KeyError:
            raise ValueError(f"cannot find peer_id = {peer}") from None

    def notify(self, peer: int, vector: int) -> None:
        """Rings one doorbell: what a guest's DOORBELL write (peer << 16 | vector) does."""
        eventfds = self.eventfds(peer)
        if not 0 <= vector < len(eventfds):
            raise ValueError(f"invalid vector {vector} on peer {peer}")
        if self.verbose:
            self._debug(f"notify peer {peer} on vector {vector}, fd {eventfds[vector]}")
        os.eventfd_write(eventfds[vector], 1)

    def notify_all(self, peer: int | None = None) -> None:
        """Every vector of `peer`, or of every peer but us."""
        for other in [peer] if peer is not None else list(self.peers):
            for vector in range(len(self.eventfds(other))):
                self.notify(other, vector)

    def dump(self) -> str:
        """Us, then every peer, with their vectors, as QEMU's client prints them."""
        lines = []
        for title, peer in [("our_id", self.own_id), *(("peer_id", peer) for peer in self.peers)]:
            lines.append(f"{title} = {peer}")
            lines += [f"  vector {vector} is enabled (fd={fd})"
                      for vector, fd in enumerate(self._protocol.peers.get(peer, ()))]
        return "\n".join(lines) + "\n"


# the console script

HELP = """\
dump: dump peers (including us)
int <peer> <vector>: notify one vector on a peer
int <peer> all: notify all vectors of a peer
int all: notify all vectors of all peers (excepting us)
"""

_INT_ONE = re.compile(r"int\s+(-?\d+)\s+(-?\d+)")
_INT_PEER = re.compile(r"int\s+(-?\d+)\s+all")


def run_command(client: IvshmemClient, command: str) -> str:
    """One command line in, what the client prints for it out."""
    command = command.strip()
    try:
        if not command:
            return ""
        if command in ("help", "?"):
            return HELP
        if command == "dump":
            return client.dump()
        if command == "int all":
            client.notify_all()
        elif match := _INT_ONE.fullmatch(command):
            client.notify(int(match[1]), int(match[2]))
        elif match := _INT_PEER.fullmatch(command):
            client.notify_all(int(match[1]))
        else:
            return "invalid command, type help\n"
    except ValueError as e:
        return f"{e}\n"
    return ""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ivshmem-client", add_help=False)
    parser.add_argument("-h", action="store_true", dest="help")
    parser.add_argument("-v", action="store_true", dest="verbose")
    parser.add_argument("-S", dest="socket_path", default=DEFAULT_SOCKET_PATH)
    return parser.parse_args(argv)


USAGE = f"""\
ivshmem-client [opts]
  -h: show this help
  -v: verbose mode
  -S <unix_sock_path>: path to the unix socket
     to connect to.
     default={DEFAULT_SOCKET_PATH}
Commands are read from stdin, one a line or separated by ';'. The client retries until the server
answers and reconnects when it goes away; at the end of stdin it goes on listening for interrupts.
SIGINT or SIGTERM quits.
"""

# How the client ends on each signal: SIGINT as the shell reports a process killed by it.
EXIT_STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 0}


class _Stop(BaseException):
    """Raised by the signal handlers, so that whatever the client waits on ends at once and the
    `with` blocks on the way out close its fds."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.status = EXIT_STATUS[signum]


def _stop(signum: int, _frame) -> None:
    raise _Stop(signum)


@contextlib.contextmanager
def _stopped_by_signals():
    """A signal that is ignored stays ignored: a script's background job must outlive its Ctrl-C."""
    previous = {signum: signal.signal(signum, _stop) for signum in EXIT_STATUS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Stdin:
    """Command lines from fd 0. Its end only stops the reading, so the client can run as a
    background listener (`ivshmem-client </dev/null &`)."""

    def __init__(self) -> None:
        self.interactive = os.isatty(0)
        self.open = True
        self._pending = ""

    def read(self) -> list[str]:
        chunk = os.read(0, READ_SIZE).decode(errors="replace")
        self.open = bool(chunk)
        *commands, self._pending = re.split(r"[\n\r;]", self._pending + (chunk or "\n"))
        return commands


def main(argv: list[str] | None = None, *, retry_interval: float = RETRY_INTERVAL) -> int:
    try:
        args = _parse_args(argv)
    except SystemExit:
        print(USAGE, end="", file=sys.stderr)
        return 1
    if args.help:
        print(USAGE, end="", file=sys.stderr)
        return 0
    stdin = _Stdin()
    with _stopped_by_signals():
        try:
            if stdin.interactive:
                print(HELP + "cmd> ", end="", flush=True)
            while True:
                with _connect(args.socket_path, args.verbose, retry_interval) as client:
                    _serve(client, stdin)
                print("disconnected from server", flush=True)
        except _Stop as stop:
            return stop.status


def _connect(path: str, verbose: bool, retry_interval: float) -> IvshmemClient:
    """Tries until the server answers: it may start after the client, or restart under it."""
    seconds = f"{retry_interval:g} second{'' if retry_interval == 1 else 's'}"
    while True:
        try:
            client = IvshmemClient(path, verbose=verbose).connect()
        except (OSError, ProtocolError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            print(f"cannot connect to server at {path}: {reason}; retry in {seconds}", file=sys.stderr, flush=True)
            time.sleep(retry_interval)
            continue
        print(f"connected to server at {path}, our_id = {client.own_id}", flush=True)
        return client


def _serve(client: IvshmemClient, stdin: _Stdin) -> None:
    """Commands from stdin and interrupts from the server, whichever comes first, until the
    server hangs up."""
    while True:
        ready = _ready([0, *client.fds()] if stdin.open else client.fds(), None)
        try:
            while (vector := client.wait_interrupt(0)) is not None:
                print(f"receive notification from peer_id={client.own_id} vector={vector}", flush=True)
            client.poll(0)
        except ConnectionError:
            return
        if 0 not in ready:
            continue
        print("".join(run_command(client, command) for command in stdin.read()), end="")
        if stdin.interactive and stdin.open:
            print("cmd> ", end="")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
