"""The Python examples of docs/ run as written on the fake kernel, so the pages cannot drift from
the code they describe. A test an example defines is called as the plugin would call it on the
fake, with a `vfio` whose host is a fresh FakeKernel and the edu as `vfio_device`."""

import pathlib
import re
from types import SimpleNamespace

import pytest

from fakekernel import FakeKernel
from fakekernel.faults import census

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [(page, n, code) for page in sorted(DOCS.glob("*.md"))
          for n, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]
EDU = SimpleNamespace(sysfs="/sys/bus/pci/devices/0000:00:03.0")


@pytest.mark.parametrize("page,n,code", BLOCKS, ids=[f"{page.name}:{n}" for page, n, _ in BLOCKS])
def test_example_runs(page, n, code):
    namespace = {"__name__": f"docs_example_{n}"}
    exec(compile(code, f"{page}:block{n}", "exec"), namespace)
    for name, test in namespace.items():
        if name.startswith("test_") and callable(test):
            with FakeKernel() as kernel:
                before = census(kernel)
                test(SimpleNamespace(host=kernel), EDU)
                assert census(kernel) == before, f"{name} left something behind"
