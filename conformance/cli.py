"""vfio-conformance: run the suite on a backend, list devices, compare reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .backends import REAL_MISSING, real_available, real_backend

SUITE = Path(__file__).resolve().parent


def _pytest_args(args, json_path: str) -> list[str]:
    out = [str(SUITE), "-p", "conformance.plugin", "--rootdir", str(SUITE.parent),
           "-p", "no:cacheprovider", f"--vfio-backend={args.backend}", f"--vfio-json={json_path}"]
    for device in args.device:
        out.append(f"--vfio-device={device}")
    if args.destructive:
        out.append("--vfio-destructive")
    out += [f"--vfio-fault={rule}" for rule in args.fault]
    if args.n:
        out += ["-p", "xdist.plugin", "-n", str(args.n)]
    if args.junit:
        out.append(f"--junitxml={args.junit}")
    if args.k:
        out += ["-k", args.k]
    out.append("-q" if not args.verbose else "-v")
    return out


def summary_table(report: dict) -> str:
    """Outcomes by area, the way a reviewer scans a run."""
    areas: dict[str, dict[str, int]] = {}
    for t in report["tests"]:
        row = areas.setdefault(t["area"], {"passed": 0, "failed": 0, "skipped": 0})
        row[t["outcome"]] = row.get(t["outcome"], 0) + 1
    lines = [f"VFIO conformance on {report['backend']} ({report['kernel']})",
             f"{'area':<16}{'passed':>8}{'failed':>8}{'skipped':>9}"]
    for area in sorted(areas):
        r = areas[area]
        lines.append(f"{area:<16}{r['passed']:>8}{r['failed']:>8}{r['skipped']:>9}")
    s = report["summary"]
    lines.append(f"{'total':<16}{s['passed']:>8}{s['failed']:>8}{s['skipped']:>9}")
    if "faults" in report:
        lines.append("kernel faults injected: " + "; ".join(report["faults"]))
    r = report.get("reliability")
    if r:
        lines.append(f"reliability: {r['injection_points']} injection points ({r['injection_points_clean']} clean), "
                     f"{r['fuzz_examples']} fuzz examples, {len(r['hostile_clients'])} hostile-client scenarios, "
                     f"{r['leaks']} leaks")
    reasons = sorted({t["reason"] for t in report["tests"] if t["outcome"] == "skipped"})
    if reasons:
        lines.append("skipped because:")
        lines += [f"  {r}" for r in reasons]
    return "\n".join(lines)


def cmd_run(args) -> int:
    import pytest

    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        json_path = args.json or os.path.join(tmp, "report.json")
        code = pytest.main(_pytest_args(args, json_path))
        try:
            with open(json_path) as f:
                report = json.load(f)
        except OSError:
            print("vfio-conformance: pytest wrote no report", file=sys.stderr)
            return int(code) or 1
    print(summary_table(report))
    if report["summary"]["passed"] + report["summary"]["failed"] == 0 and not report["tests"]:
        print("vfio-conformance: no tests ran", file=sys.stderr)
        return 5
    return int(code)


def cmd_devices(args) -> int:
    if args.backend == "real":
        if not real_available():
            print(REAL_MISSING)
            return 1
        backend = real_backend(args.device, False)
        devices = backend.devices
    else:
        from fakekernel import FakeKernel, Topology

        from .backends import describe

        with FakeKernel(Topology.named(args.topology)) as kernel:
            devices = [describe(kernel, spec.bdf) for spec in kernel.topology.devices]
    print(f"{'device':<14}{'id':<11}{'model':<18}{'group':<7}driver")
    for d in devices:
        print(f"{d.bdf:<14}{d.vendor:04x}:{d.device:04x}  {d.model:<18}{str(d.group):<7}{d.driver}")
    return 0


def cmd_report(args) -> int:
    from .report import Matrix, ReportError, format_text, load_runs, render_html

    try:
        matrix = Matrix(load_runs(args.reports))
    except ReportError as e:
        print(f"vfio-conformance report: {e}", file=sys.stderr)
        return 2
    print(format_text(matrix))
    if args.html:
        Path(args.html).write_text(render_html(matrix))
    return 1 if matrix.divergences else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vfio-conformance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the conformance suite")
    run.add_argument("--backend", choices=("fake", "real"), default="fake")
    run.add_argument("--device", action="append", default=[], metavar="BDF|SYSFS")
    run.add_argument("--destructive", action="store_true", help="allow reset and DMA on real devices")
    run.add_argument("-n", type=int, default=0, metavar="N", help="pytest-xdist workers")
    run.add_argument("--junit", metavar="FILE")
    run.add_argument("--json", metavar="FILE")
    run.add_argument("-k", metavar="EXPR", help="pytest -k selection")
    run.add_argument("--fault", action="append", default=[], metavar="RULE",
                     help="fail kernel calls on the fake, e.g. 'ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY' (repeatable)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)
    dev = sub.add_parser("devices", help="list what a backend offers")
    dev.add_argument("--backend", choices=("fake", "real"), default="fake")
    dev.add_argument("--device", action="append", default=[], metavar="BDF|SYSFS")
    dev.add_argument("--topology", default="vm", help="fake kernel topology (default: vm, the CI VM's devices)")
    dev.set_defaults(func=cmd_devices)
    rep = sub.add_parser("report", help="compare runs side by side; exit 1 on a divergence")
    rep.add_argument("reports", nargs="+", metavar="JSON", help="run --json files, e.g. fake.json real.json")
    rep.add_argument("--html", metavar="FILE", help="also write the matrix as a static HTML page")
    rep.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
