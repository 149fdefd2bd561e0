"""Figure 8: the conformance suite on the fake with 2 xdist workers, against the 60 s the issue
allows. The ratio beside it is against a pytest run of one trivial test with the same two
workers: what starting pytest and xdist costs on this machine, for context."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from .harness import Figure, Target
from .scale import Scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = [sys.executable, "-m", "conformance.cli", "run", "-n", "2"]
TRIVIAL = "def test_nothing():\n    pass\n"


def _wall(argv: list[str], cwd: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def figure_8(scale: Scale) -> Figure | None:
    if not scale.suite_runs:
        return None
    suite, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "test_trivial.py"), "w") as f:
            f.write(TRIVIAL)
        trivial = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "test_trivial.py"]
        for _ in range(scale.suite_runs):
            suite.append(_wall(SUITE, ROOT))
            ratios.append(suite[-1] / _wall(trivial, tmp))
    return Figure("8", "conformance suite on the fake, -n 2 (wall)", "vfio-conformance run -n 2",
                  "pytest -n 2 of one trivial test", ratios, Target("<", 60, "s"), measured=suite,
                  note=f"the target is the suite's own wall time: min {min(suite):.1f} s, max {max(suite):.1f} s")
