"""Hold vfio_impl.uapi to this machine's <linux/vfio.h>, <linux/vfio_ccw.h> and <linux/pci_regs.h>.

What ``python -m vfio_impl.uapi --json`` claims is turned into one C program
that prints what the compiler makes of every name; a name the header lacks
breaks the compile, which fails the test.  A second pass reads the header
text to make sure the JSON leaves nothing out.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {
    "linux/vfio.h": Path("/usr/include/linux/vfio.h"),
    "linux/vfio_ccw.h": Path("/usr/include/linux/vfio_ccw.h"),
}
# Named values; pci_regs is only the part of <linux/pci_regs.h> the project uses.
VALUES = ("ioctls", "constants", "pci_regs")


@pytest.fixture(scope="module", autouse=True)
def gcc(debian_package) -> str:
    """gcc, with the kernel's UAPI headers (Debian's linux-libc-dev) it compiles against."""
    for header in HEADERS.values():
        debian_package("linux-libc-dev", str(header))
    return debian_package("gcc", "gcc")


@pytest.fixture(scope="module")
def abi() -> dict:
    out = subprocess.run([sys.executable, "-m", "vfio_impl.uapi", "--json"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def c_program(abi: dict) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <sys/ioctl.h>",
        *(f"#include <{header}>" for header in HEADERS),
        "#include <linux/pci_regs.h>",
        "",
        "/* the value as its own C type sees it, and that type's width */",
        '#define SHOW(kind, name) printf("%s %s %zu %llu\\n", kind, #name, '
        "sizeof(name), (unsigned long long)(name))",
        "",
        "int main(void)",
        "{",
    ]
    for kind in VALUES:
        lines += [f'\tSHOW("{kind}", {name});' for name in abi[kind]]
    for name, info in abi["structs"].items():
        lines.append(f'\tprintf("size {name} %zu\\n", sizeof(struct {name}));')
        lines += [f'\tprintf("offset {name}.{member} %zu\\n", offsetof(struct {name}, {member}));'
                  for member in info["offsets"]]
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_output(abi, gcc, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("uapi_abi")
    (tmp / "abi.c").write_text(c_program(abi))
    build = subprocess.run([gcc, "-std=gnu11", "-Wall", "-o", str(tmp / "abi"), str(tmp / "abi.c")],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"the header disagrees with the JSON:\n{build.stderr}"
    return subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout


def mismatches(abi: dict, c_output: str) -> list[str]:
    """Every claim in ``abi`` that the C program's output contradicts or lacks."""
    seen: dict[tuple[str, str], int] = {}
    for line in c_output.splitlines():
        kind, name, *rest = line.split()
        if kind in VALUES:
            width, value = map(int, rest)
            seen[kind, name] = value & ((1 << 8 * width) - 1)
        else:
            seen[kind, name] = int(rest[0])

    claims = [(kind, name, value) for kind in VALUES for name, value in abi[kind].items()]
    for struct_name, info in abi["structs"].items():
        claims.append(("size", struct_name, info["size"]))
        claims += [("offset", f"{struct_name}.{member}", offset)
                   for member, offset in info["offsets"].items()]
    return [f"{kind} {name}: JSON says {value}, C says {seen.get((kind, name))}"
            for kind, name, value in claims if seen.get((kind, name)) != value]


def test_json_agrees_with_the_compiler(abi, c_output):
    assert mismatches(abi, c_output) == []


def test_a_wrong_claim_is_caught(abi, c_output):
    wrong = json.loads(json.dumps(abi))
    wrong["ioctls"]["VFIO_DEVICE_SET_IRQS"] += 1
    wrong["constants"]["VFIO_REGION_TYPE_PCI_VENDOR_TYPE"] = -(1 << 31)
    wrong["structs"]["vfio_irq_set"]["size"] += 1
    wrong["structs"]["vfio_region_info"]["offsets"]["offset"] -= 8
    wrong["pci_regs"]["PCI_MSIX_FLAGS_ENABLE"] >>= 1
    found = mismatches(wrong, c_output)
    assert len(found) == 5, found
    assert any("VFIO_DEVICE_SET_IRQS" in line for line in found)


def test_a_name_the_header_lacks_breaks_the_build(abi, gcc, tmp_path):
    wrong = json.loads(json.dumps(abi))
    wrong["constants"]["VFIO_NO_SUCH_FLAG"] = 1
    (tmp_path / "abi.c").write_text(c_program(wrong))
    build = subprocess.run([gcc, "-fsyntax-only", str(tmp_path / "abi.c")],
                           capture_output=True, text=True)
    assert build.returncode != 0 and "VFIO_NO_SUCH_FLAG" in build.stderr


# --- completeness: everything the header text declares is in the JSON ---

def _header_text() -> str:
    text = "\n".join(path.read_text() for path in HEADERS.values())
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"\\\n", " ", text)


def _defines(text: str) -> dict[str, str]:
    """Object-like macros with a body; guards and function-like macros drop out."""
    found = re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(?![\w(])[ \t]*(.*)$", text, flags=re.M)
    return {name: body.strip() for name, body in found if body.strip()}


def _enum_members(text: str) -> list[str]:
    members = []
    for body in re.findall(r"\benum\b\s*\w*\s*\{(.*?)\}", text, flags=re.S):
        members += [item.split("=")[0].strip() for item in body.split(",") if item.strip()]
    return members


def _struct_members(text: str) -> dict[str, list[str]]:
    """Top-level member names per struct, anonymous unions opened up."""
    text = re.sub(r"^[ \t]*#.*$", "", text, flags=re.M)
    structs = {}
    for match in re.finditer(r"\bstruct\s+(\w+)\s*\{", text):
        depth, pos = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            pos += 1
        body = re.sub(r"\bunion\s*\{|\}", " ", text[match.end():pos - 1])
        structs[match.group(1)] = [
            re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl).group(1)
            for decl in body.split(";") if decl.strip()
        ]
    return structs


def test_every_ioctl_and_constant_in_the_header_is_in_the_json(abi):
    text = _header_text()
    defines = _defines(text)
    ioctls = {name for name, body in defines.items() if "_IO" in body}
    constants = {name for name, body in defines.items()
                 if name not in ioctls and not body.startswith('"')} | set(_enum_members(text))
    assert ioctls == set(abi["ioctls"])
    assert constants == set(abi["constants"])


def test_every_struct_and_member_in_the_header_is_in_the_json(abi):
    header = _struct_members(_header_text())
    assert set(header) == set(abi["structs"])
    for name, members in header.items():
        assert members == list(abi["structs"][name]["offsets"]), name
