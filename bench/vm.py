"""Figure 9: MSI interrupts per second through vfio_impl on the real runner's edu, as a ratio
against a raw-ioctl loop in the same guest (bench/guest_msi.py). The VM runs under TCG, so
only the ratio means anything."""

from __future__ import annotations

import json
import os
import subprocess

from .harness import Figure, Target
from .scale import Scale
from .suite import ROOT

RESULTS = os.path.join(ROOT, "results", "bench-vm")
TIMEOUT_S = 900


def figure_9(scale: Scale) -> list[Figure] | None:
    if not scale.vm:
        return None
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, "guest-msi.json")
    if os.path.exists(out):
        os.unlink(out)
    rounds = 2000 if scale.repeats > 5 else 500
    cmd = ["bash", os.path.join(ROOT, "ci", "real-vm.sh"), "--timeout", str(TIMEOUT_S), "--results", RESULTS, "--",
           "python3", "-m", "bench.guest_msi", "--json", out, "--rounds", str(rounds), "--repeats", str(scale.repeats)]
    run = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode or not os.path.exists(out):
        tail = "\n".join(run.stdout.splitlines()[-15:])
        raise RuntimeError(f"ci/real-vm.sh exited {run.returncode}; console in {RESULTS}/console.log:\n{tail}")
    with open(out) as f:
        guest = json.load(f)
    raw = "the raw loop: os and fcntl.ioctl, raise, blocking eventfd read, ack"
    hot = ", ".join(f"{row['function']} {row['own']:.0%}" for row in guest["profile"][:6])
    return [Figure("9", "MSI rate through vfio_impl in the real-runner VM",
                   f"VFIOPCIDevice on edu ({guest['device']}): raise, the Machine's loop takes the MSI, ack", raw,
                   guest["ratios"]["vfio_impl"], Target(">=", 0.8),
                   note=f"TCG guest, {guest['rounds']} round trips a repeat; own time: {hot}"),
            Figure("9e", "MSI rate of the raw loop waiting in epoll", "the raw loop with an epoll wait before the read",
                   raw, guest["ratios"]["raw_epoll"], note="the least wait of any loop: a ceiling for 9"),
            Figure("9s", "MSI rate of the raw loop waiting in selectors", "the raw loop with a selectors select "
                   "before the read", raw, guest["ratios"]["raw_selectors"], note="the Machine's own wait: 9's ceiling"),
            Figure("9c", "MSI rate of the raw loop as three Python calls", "raise, read and ack each a one-line "
                   "Python function", raw, guest["ratios"]["raw_calls"], note="what an API of three calls costs there")]
