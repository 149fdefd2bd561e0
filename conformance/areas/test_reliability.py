"""Reliability: every kernel call of every vfio_impl setup path fails once, in turn, on the fake
kernel; each must end in the step's own error (or QEMU's report and a degraded device) with no fd,
eventfd, mmap, DMA mapping, group or container reference left, and the calls and outcomes must be
the ones pinned in fault_points.txt, so a new call cannot join a setup path unwalked."""

import difflib

import pytest

from conformance.reliability import PATHS, TABLE, read_table, walk


pytestmark = pytest.mark.vfio(fake_only="the fake kernel's fault injection")


@pytest.fixture(autouse=True)
def fake_backend(vfio):
    """The walks build their own fake kernels; this only skips them on real, as a runner's limit."""


@pytest.fixture(scope="module")
def pinned():
    return read_table(TABLE.read_text())


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_every_fault_point_of_a_setup_path_ends_clean(path, pinned, record_reliability):
    result = walk(path)
    record_reliability(result.figures())
    assert result.points, f"{path.name}: the clean run made no kernel call to fail"
    assert result.clean, f"{path.name}: a failure crashed, fired elsewhere or leaked:\n{result.render()}"
    found = result.render().splitlines()[1:]
    expected = pinned.get(path.name)
    assert expected is not None, f"{path.name} is not in {TABLE.name}; run python3 -m conformance.reliability --write"
    diff = "\n".join(difflib.unified_diff(expected, found, "pinned", "walked", lineterm=""))
    assert found == expected, (f"{path.name} makes other calls or takes them differently than {TABLE.name} pins; "
                               f"review, then python3 -m conformance.reliability --write\n{diff}")


def test_every_pinned_path_is_still_walked(pinned):
    assert sorted(pinned) == sorted(p.name for p in PATHS)
