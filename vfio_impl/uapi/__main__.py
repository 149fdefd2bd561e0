"""``python -m vfio_impl.uapi [--json]``: the ABI as this package has it.

The JSON is what tests/test_uapi_abi.py compiles against the real header, and
what to diff when a machine's header and this package disagree.
"""

import argparse
import json
import sys

from vfio_impl.uapi import CONSTANTS, IOCTLS, STRUCTS, pci_regs


def _pci_regs() -> dict[str, int]:
    return {name: value for name, value in vars(pci_regs).items() if name.startswith("PCI")}


def describe() -> dict:
    return {
        "ioctls": dict(IOCTLS),
        "constants": dict(CONSTANTS),
        "pci_regs": _pci_regs(),
        "structs": {
            name: {"size": layout.size, "offsets": dict(layout.offsets)}
            for name, layout in STRUCTS.items()
        },
    }


def _table(abi: dict) -> str:
    lines = [f"ioctls ({len(abi['ioctls'])})"]
    lines += [f"  {name:<40} {number:#010x}" for name, number in abi["ioctls"].items()]
    for kind in ("constants", "pci_regs"):
        lines += ["", f"{kind} ({len(abi[kind])})"]
        lines += [f"  {name:<48} {value:>10}  {value:#x}" for name, value in abi[kind].items()]
    lines += ["", f"structs ({len(abi['structs'])})"]
    for name, info in abi["structs"].items():
        lines.append(f"  struct {name}  sizeof {info['size']}")
        lines += [f"    {offset:>4}  {member}" for member, offset in info["offsets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfio_impl.uapi", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    abi = describe()
    print(json.dumps(abi) if args.json else _table(abi))
    return 0


if __name__ == "__main__":
    sys.exit(main())
