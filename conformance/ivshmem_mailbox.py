"""A second ivshmem peer that a test in a VM can drive: the host runs a responder at the server,
and the guest asks it for things through a mailbox directory both of them see.

The guest has no way to the host's server, and the shared memory is no channel either: once a
test maps or reads BAR2 through vfio-pci, the kernel claims the BAR and revokes every sysfs
`resource2` mapping (a SIGBUS on the next access). So the mailbox is a directory on a share
(ci/real-vm.sh uses its results share, the same path on both sides), and each request and
reply is a small JSON file put in place by rename. Run the host half with

    python3 -m conformance.ivshmem_mailbox -S SOCKET --mailbox DIR [--ready FILE]

and point the guest's suite at DIR with VFIO_IVSHMEM_MAILBOX=DIR.

Files in DIR: `peer` (the responder's id and the device's, rewritten as peers come and go),
`request` ({"seq", "command", "args"}) and `reply` ({"seq", "result", "data"}).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time

POLL_S = 0.001
MAILBOX_ENV = "VFIO_IVSHMEM_MAILBOX"


class MailboxError(Exception):
    """The responder did not answer, or answered a request it could not do."""


def _put(path: str, value: dict) -> None:
    """Written aside and renamed, so a reader on the other side never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def _get(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


class Responder:
    """The host half: an ivshmem peer that counts the doorbells it gets per vector and carries
    out the guest's requests. `client` is a connected `IvshmemClient`."""

    def __init__(self, client, mailbox: str, taken_timeout: float = 5.0):
        self.client = client
        self.mailbox = mailbox
        self.taken_timeout = taken_timeout
        self.received: dict[int, int] = {}
        self.served = 0
        self._last = _get(os.path.join(mailbox, "request")) or {}
        self._published: dict | None = None
        self._publish()

    def device_id(self) -> int:
        """The other peer: the device under test, as the only peer besides us."""
        return min(self.client.peers, default=-1)

    def _publish(self) -> None:
        ids = {"id": self.client.own_id, "device_id": self.device_id()}
        if ids != self._published:
            _put(os.path.join(self.mailbox, "peer"), ids)
            self._published = ids

    def step(self, timeout: float) -> None:
        """One round: doorbells and server messages (waiting up to `timeout`), then the mailbox."""
        vector = self.client.wait_interrupt(timeout)
        while vector is not None:
            self.received[vector] = self.received.get(vector, 0) + 1
            vector = self.client.wait_interrupt(0)
        self.client.poll(0)
        self._publish()
        request = _get(os.path.join(self.mailbox, "request"))
        if request and request.get("seq") != self._last.get("seq"):
            self._last = request
            _put(os.path.join(self.mailbox, "reply"), {"seq": request["seq"], **self._serve(request)})
            self.served += 1

    def _serve(self, request: dict) -> dict:
        command, args = request.get("command"), request.get("args", [])
        shm = self.client.shm
        if command == "ring":
            return {"result": self._ring(*args)}
        if command == "counts":
            return {"result": 0, "counts": self.received}
        if command == "read" and 0 <= args[0] <= args[0] + args[1] <= len(shm):
            return {"result": 0, "data": shm[args[0]:args[0] + args[1]].hex()}
        if command == "write":
            data = bytes.fromhex(args[1])
            if 0 <= args[0] <= args[0] + len(data) <= len(shm):
                shm[args[0]:args[0] + len(data)] = data
                return {"result": 0}
        return {"result": -1}

    def _ring(self, vector: int) -> int:
        """Rings the device and waits until it has read its eventfd, as the fake's peer does: a
        doorbell rung while the guest's MSI-X is off is then already dropped, not still waiting
        in the eventfd for the test's next step."""
        device = self.device_id()
        if not 0 <= vector < self.client.peers.get(device, 0):
            return -1
        self.client.notify(device, vector)
        fd = self.client.eventfds(device)[vector]
        deadline = time.monotonic() + self.taken_timeout
        while select.select([fd], [], [], 0)[0]:
            if time.monotonic() > deadline:
                return -1
            time.sleep(POLL_S / 10)
        return 0

    def close(self) -> None:
        """Takes the peer file away, so a guest that comes later finds no responder."""
        try:
            os.unlink(os.path.join(self.mailbox, "peer"))
        except FileNotFoundError:
            pass


class MailboxPeer:
    """The guest half: the `ivshmem_peer` fixture's interface through the mailbox directory."""

    def __init__(self, mailbox: str, vectors: int, timeout: float = 10.0):
        self.mailbox = mailbox
        self.vectors = vectors
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while (ids := _get(os.path.join(mailbox, "peer"))) is None or ids["device_id"] < 0:
            if time.monotonic() > deadline:
                raise MailboxError(f"no ivshmem responder with a device at {mailbox} (is "
                                   "`python3 -m conformance.ivshmem_mailbox` running on the host?)")
            time.sleep(POLL_S)
        self.id, self.device_id = ids["id"], ids["device_id"]
        self._seq = (_get(os.path.join(mailbox, "reply")) or {}).get("seq", 0)
        self._seen = self._counts()

    def _call(self, command: str, *args) -> dict:
        self._seq += 1
        _put(os.path.join(self.mailbox, "request"), {"seq": self._seq, "command": command, "args": list(args)})
        deadline = time.monotonic() + self.timeout
        while (reply := _get(os.path.join(self.mailbox, "reply"))) is None or reply["seq"] != self._seq:
            if time.monotonic() > deadline:
                raise MailboxError(f"the ivshmem responder did not answer request {self._seq} "
                                   f"({command} {args}) within {self.timeout} s")
            time.sleep(POLL_S)
        if reply["result"] < 0:
            raise MailboxError(f"the ivshmem responder refused {command} {args}")
        return reply

    def ring(self, vector: int) -> None:
        self._call("ring", vector)

    def _counts(self) -> dict[int, int]:
        """Doorbells the responder has had per vector since it started; JSON keys are strings."""
        return {int(v): n for v, n in self._call("counts")["counts"].items()}

    def wait_doorbell(self, vector: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            count = self._counts().get(vector, 0)
            if count > self._seen.get(vector, 0):
                self._seen[vector] = count
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def read_shm(self, offset: int, n: int) -> bytes:
        return bytes.fromhex(self._call("read", offset, n)["data"])

    def write_shm(self, offset: int, data: bytes) -> None:
        self._call("write", offset, bytes(data).hex())

    def close(self) -> None:
        """Nothing is held between calls."""


def main(argv: list[str] | None = None) -> int:
    from vfio_impl.ivshmem.client import IvshmemClient

    ap = argparse.ArgumentParser(prog="python3 -m conformance.ivshmem_mailbox", description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", dest="socket", required=True, help="the ivshmem server's socket")
    ap.add_argument("--mailbox", required=True, metavar="DIR", help="the directory shared with the guest")
    ap.add_argument("--ready", metavar="FILE", help="create FILE once the responder serves")
    args = ap.parse_args(argv)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    os.makedirs(args.mailbox, exist_ok=True)
    with IvshmemClient(args.socket) as client:
        responder = Responder(client, args.mailbox)
        print(f"ivshmem responder: peer {client.own_id}, mailbox {args.mailbox}", flush=True)
        if args.ready:
            open(args.ready, "w").close()
        try:
            while not stop:
                responder.step(POLL_S)
        finally:
            responder.close()
        print(f"ivshmem responder: served {responder.served} requests, doorbells {responder.received}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
