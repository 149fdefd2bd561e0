"""python3 -m bench [--quick] [--json FILE] [FIGURE ...]: every figure of issue 9 as a ratio
against a baseline measured in the same run, as a table and as JSON."""

from __future__ import annotations

import argparse
import sys

from . import FIGURES
from .harness import machine, table, write_json
from .scale import FULL, QUICK, SCALES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", nargs="*", metavar="FIGURE", help=f"figures to run (default all: {' '.join(FIGURES)})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and operations, for development")
    parser.add_argument("--scale", choices=sorted(SCALES), help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE", default="results/bench.json", help="default: %(default)s")
    args = parser.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {' '.join(unknown)}; known: {' '.join(FIGURES)}")
    scale = SCALES[args.scale] if args.scale else QUICK if args.quick else FULL
    before = machine()
    print(f"bench: {scale.name} scale, {before['cpus']} CPUs, load {before['loadavg'][0]:.2f}", file=sys.stderr)
    figures, failed = [], []
    for name in args.figures or FIGURES:
        print(f"bench: figure {name} ...", file=sys.stderr, flush=True)
        try:
            result = FIGURES[name](scale)
        except Exception as e:  # one broken figure (the VM, say) must not cost the others
            print(f"bench: figure {name} failed: {e}", file=sys.stderr)
            failed.append(name)
            continue
        figures += result if isinstance(result, list) else [result] if result else []
    print(table(figures))
    if args.json:
        write_json(args.json, figures, before, scale.name)
        print(f"\nwrote {args.json}")
    if failed:
        print(f"figures that did not run: {' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
