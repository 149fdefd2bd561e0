"""A second peer at the ivshmem-doorbell's server, for tests.

On the fake the server is the one the `vfio` fixture started for its doorbell with
doorbell_servers (as the CI VM's host starts one before QEMU), and the peer is an IvshmemClient
there. On the real backend the peer is
a host-side responder that the guest reaches through a mailbox directory
(conformance.ivshmem_mailbox).
"""

from __future__ import annotations

import collections
import os
import select
import time

DOORBELL = "ivshmem-doorbell"
WAIT = 5.0


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class ClientPeer:
    """The fake backend's peer: an IvshmemClient at the server of the fake's doorbell `device`."""

    def __init__(self, device, socket_path: str, vectors: int):
        from vfio_impl.ivshmem.client import IvshmemClient

        from .raw import wait_for

        self.device = device
        self.vectors = vectors
        self.client = IvshmemClient(socket_path, vectors=vectors).connect()
        self.id = self.client.own_id
        self.device_id = next(iter(self.client.peers))
        self._received: collections.Counter[int] = collections.Counter()
        self._seen: collections.Counter[int] = collections.Counter()
        # The device hears of a new peer on the kernel's worker, as QEMU does in its main loop.
        if not wait_for(lambda: len(device.peer.peers.get(self.id, ())) == vectors, WAIT):
            self.close()
            raise TimeoutError(f"the ivshmem-doorbell never heard of peer {self.id}")

    def ring(self, vector: int) -> None:
        """Rings the device on `vector` and returns once the device has taken the doorbell, so
        one rung while MSI-X is off is gone by then rather than waiting to be read."""
        from .raw import wait_for

        self.client.notify(self.device_id, vector)
        fd = self.device.own_eventfds[vector]
        if not wait_for(lambda: not _readable(fd), WAIT):
            raise TimeoutError(f"the ivshmem-doorbell did not take the doorbell on vector {vector}")

    def wait_doorbell(self, vector: int, timeout: float = WAIT) -> bool:
        """Whether the device rang us on `vector` since the last call, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while self._received[vector] <= self._seen[vector]:
            got = self.client.wait_interrupt(max(0.0, deadline - time.monotonic()))
            if got is None:
                return False
            self._received[got] += 1
        self._seen[vector] = self._received[vector]
        return True

    def _window(self, offset: int, n: int) -> slice:
        if offset < 0 or offset + n > len(self.client.shm):
            raise ValueError(f"{n} bytes at {offset:#x} are outside the {len(self.client.shm):#x}-byte shared memory")
        return slice(offset, offset + n)

    def read_shm(self, offset: int, n: int) -> bytes:
        return bytes(self.client.shm[self._window(offset, n)])

    def write_shm(self, offset: int, data: bytes) -> None:
        self.client.shm[self._window(offset, len(data))] = data

    def close(self) -> None:
        self.client.close()


def peer_for(vfio):
    """The fixture's peer for the backend: an IvshmemClient at the fake's server, or on real the
    host's responder, reached through a mailbox directory both sides share."""
    import pytest

    info = vfio.find(DOORBELL)
    if info is None:
        pytest.skip(f"{vfio.kind} backend: no {DOORBELL} device bound to vfio-pci")
    if vfio.kind != "fake":
        return _mailbox_peer(info)
    device = vfio.host.functions[info.bdf]
    return ClientPeer(device, device.chardev, device.vectors)


def _mailbox_peer(info):
    """The host's responder, through the mailbox directory VFIO_IVSHMEM_MAILBOX names; the MSI-X
    table size of the device (from sysfs config, which any reader may see) is its vectors."""
    import pytest

    from .ivshmem_mailbox import MAILBOX_ENV, MailboxPeer
    from .models import walk_caps

    mailbox = os.environ.get(MAILBOX_ENV)
    if not mailbox:
        pytest.skip(f"real backend: no host ivshmem peer ({MAILBOX_ENV} is unset; run "
                    "`python3 -m conformance.ivshmem_mailbox` on the host, as ci/real-vm.sh does)")
    with open(f"{info.sysfs}/config", "rb") as f:
        config = f.read(256)

    def read(off: int, size: int) -> int:
        return int.from_bytes(config[off:off + size], "little")

    msix = next((pos for pos, cap in walk_caps(read) if cap == 0x11), None)
    return MailboxPeer(mailbox, (read(msix + 2, 2) & 0x7FF) + 1 if msix else 0)
