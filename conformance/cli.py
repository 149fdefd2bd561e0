"""vfio-conformance: run the VFIO conformance suite on a backend, list devices, compare reports.

Exit status: 0 every test passed or skipped, with at least one passed; 1 a test failed (report:
the runs diverge); 2 the command line is wrong; 3 the backend or a device named with --device
cannot be used; 4 a file cannot be read or written; 5 nothing was tested (no test passed, or none
ran on a named device; report: a run passed nothing); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from vfio_impl.info import package_version

from .backends import REAL_MISSING, DeviceError, check_named, kernel_label, kernel_profile, real_available, real_backend

SUITE = Path(__file__).resolve().parent
OK, FAILED, USAGE, BAD_DEVICE, BAD_FILE, NOTHING_TESTED, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
# pytest's exit codes, as this command reports them.
FROM_PYTEST = {0: OK, 1: FAILED, 2: INTERRUPTED, 3: FAILED, 4: USAGE, 5: NOTHING_TESTED}


class CommandError(Exception):
    """One line for the user and the exit status that goes with it; never a traceback."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def writable(path: str, flag: str) -> str:
    """Checks an output path before the work that fills it, not after."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise CommandError(f"{flag} {path}: is a directory; name a file", BAD_FILE)
    if not parent.is_dir():
        raise CommandError(f"{flag} {path}: directory {parent} does not exist", BAD_FILE)
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CommandError(f"{flag} {path}: not writable", BAD_FILE)
    return path


def _pytest_args(args, json_path: str) -> list[str]:
    out = [str(SUITE), "-p", "conformance.plugin", "--rootdir", str(SUITE.parent),
           "-p", "no:cacheprovider", f"--vfio-backend={args.backend}", f"--vfio-json={json_path}"]
    out += [f"--vfio-device={device}" for device in args.device]
    if args.kernel:
        out.append(f"--vfio-kernel={args.kernel}")
    if args.destructive:
        out.append("--vfio-destructive")
    out += [f"--vfio-fault={rule}" for rule in args.fault]
    if args.n:
        out += ["-p", "xdist.plugin", "-n", str(args.n)]
    if args.junit:
        out += [f"--junitxml={args.junit}", "-o", f"junit_suite_name=vfio-conformance[{args.backend} "
                                                  f"{kernel_label(args.backend, args.kernel).removeprefix('fake ')}]"]
    if args.k:
        out += ["-k", args.k]
    out.append("-v" if args.verbose else "-q")
    return out + args.pytest_args


def summary_table(report: dict) -> str:
    """Outcomes by area, the way a reviewer scans a run."""
    areas: dict[str, dict[str, int]] = {}
    for t in report["tests"]:
        row = areas.setdefault(t["area"], {"passed": 0, "failed": 0, "skipped": 0})
        row[t["outcome"]] = row.get(t["outcome"], 0) + 1
    lines = [f"VFIO conformance on {report['backend']} ({report['kernel']})"]
    if report.get("devices"):
        lines.append("devices tested: " + ", ".join(report["devices"]))
    lines.append(f"{'area':<16}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for area in sorted(areas):
        r = areas[area]
        lines.append(f"{area:<16}{r['passed']:>8}{r['failed']:>8}{r['skipped']:>9}")
    s = report["summary"]
    lines.append(f"{'total':<16}{s['passed']:>8}{s['failed']:>8}{s['skipped']:>9}")
    if "faults" in report:
        lines.append("kernel faults injected: " + "; ".join(report["faults"]))
    r = report.get("reliability")
    if r:
        parts = [f"{r['injection_points']} injection points ({r['injection_points_clean']} clean)"]
        if r["fuzz_examples"]:
            parts.append(f"{r['fuzz_examples']} fuzz examples")
        if r["hostile_clients"]:
            parts.append(f"{len(r['hostile_clients'])} hostile-client scenarios")
        lines.append(f"reliability: {', '.join(parts)}, {r['leaks']} leaks")
    failures = [t for t in report["tests"] if t["outcome"] == "failed"]
    if failures:
        lines.append("failed:")
        lines += [f"  {t['id']}: {t['reason']}" for t in failures]
    reasons = sorted({t["reason"] for t in report["tests"] if t["outcome"] == "skipped"})
    if reasons:
        lines.append("skipped because:")
        lines += [f"  {r}" for r in reasons]
    if report.get("interrupted"):
        lines.append("interrupted: the table counts only the tests that finished")
    return "\n".join(lines)


def cmd_run(args) -> int:
    if args.fault and args.backend == "real":
        raise CommandError("--fault injects faults into the fake kernel; it needs --backend fake", USAGE)
    _parse_faults(args.fault)
    if args.kernel:
        if args.backend == "real":
            raise CommandError("--kernel picks the fake kernel's profile; the real backend tests the running kernel",
                               USAGE)
        try:
            kernel_profile("fake", args.kernel)
        except ValueError as e:
            raise CommandError(f"--kernel: {e}", USAGE) from None
    for path, flag in ((args.json, "--json"), (args.junit, "--junit")):
        if path:
            writable(path, flag)
    if args.device:
        try:
            check_named(args.backend, args.device)
        except DeviceError as e:
            raise CommandError(str(e), BAD_DEVICE) from None
    import pytest

    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        json_path = args.json or os.path.join(tmp, "report.json")
        code = FROM_PYTEST.get(int(pytest.main(_pytest_args(args, json_path))), FAILED)
        try:
            with open(json_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            raise CommandError("pytest wrote no report; its own messages are above", code or FAILED) from None
    print(summary_table(report))
    if report.get("verdict"):
        print(f"vfio-conformance: {report['verdict']}", file=sys.stderr)
    return code


def _parse_faults(rules: list[str]) -> None:
    from fakekernel.faults import Fault

    for rule in rules:
        try:
            Fault.parse(rule)
        except ValueError as e:
            raise CommandError(f"--fault {rule}: {e}", USAGE) from None


def _check_topology(name: str) -> None:
    from fakekernel import Topology

    try:
        Topology.named(name)
    except ValueError as e:
        raise CommandError(f"--topology: {e}", USAGE) from None


def cmd_devices(args) -> int:
    if args.backend == "real":
        if not real_available():
            raise CommandError(REAL_MISSING, BAD_DEVICE)
        try:
            devices = real_backend(args.device, False).devices
        except DeviceError as e:
            raise CommandError(str(e), BAD_DEVICE) from None
        print(f"backend: real ({kernel_label('real')})")
    else:
        from .backends import check_device, describe, fake_kernel, vfio_bound

        _check_topology(args.topology)
        with fake_kernel(args.topology) as kernel:
            try:
                devices = ([check_device(kernel, d) for d in args.device] if args.device
                           else [describe(kernel, spec.bdf) for spec in kernel.topology.devices]
                           + [d for d in vfio_bound(kernel) if d.bus != "pci"])
            except DeviceError as e:
                raise CommandError(f"{e} (on the fake's {args.topology!r} topology)", BAD_DEVICE) from None
        print(f"backend: fake ({kernel_label('fake')}), topology {args.topology}")
    width = max([14, *(len(d.bdf) + 2 for d in devices)])
    print(f"{'device':<{width}}{'id':<11}{'model':<18}{'group':<12}driver")
    for d in devices:
        ident = f"{d.vendor:04x}:{d.device:04x}" if d.bus == "pci" else d.bus
        group = f"noiommu-{d.group}" if d.noiommu else str(d.group)
        print(f"{d.bdf:<{width}}{ident:<11}{d.model:<18}{group:<12}{d.driver}")
    return OK


def cmd_report(args) -> int:
    from .report import Matrix, ReportError, format_text, load_runs, render_html

    if args.html:
        writable(args.html, "--html")
    try:
        matrix = Matrix(load_runs([args.first, *args.others]))
    except ReportError as e:
        raise CommandError(str(e), BAD_FILE) from None
    print(format_text(matrix))
    if args.html:
        try:
            Path(args.html).write_text(render_html(matrix))
        except OSError as e:
            raise CommandError(f"--html {args.html}: {e.strerror}", BAD_FILE) from None
    if matrix.empty_runs:
        return NOTHING_TESTED
    return FAILED if matrix.divergences else OK


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} workers: give 0 (no xdist) or more")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vfio-conformance", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="{run,devices,report}")
    run = sub.add_parser(
        "run", help="run the conformance suite",
        usage="%(prog)s [options] [-- PYTEST_ARGS ...]",
        description="Run the conformance suite on the embedded fake kernel (default) or on this machine's "
                    "VFIO, print a table by area, and exit non-zero unless something was tested and nothing "
                    "failed. Arguments after -- go to pytest as they are (-x, --maxfail=N, -q, ...).")
    run.add_argument("--backend", choices=("fake", "real"), default="fake",
                     help="fake: the embedded fake Linux kernel (default); real: /dev/vfio on this machine")
    run.add_argument("--device", action="append", default=[], metavar="BDF|SYSFS",
                     help="test only this device (repeatable; 0000:03:00.0, 03:00.0 or a sysfs path); it must "
                          "be bound to vfio-pci in a viable group, and at least one test must pass on it")
    run.add_argument("--kernel", metavar="NAME",
                     help="the fake kernel's version profile (default: 6.1, Debian bookworm's Linux as the CI VM runs it)")
    run.add_argument("--destructive", action="store_true",
                     help="allow tests that reset devices or make them DMA (real backend; always on for the fake)")
    run.add_argument("-n", type=_count, default=0, metavar="N", help="run on N pytest-xdist workers (default: 0, in process)")
    run.add_argument("--junit", metavar="FILE", help="write a JUnit XML file (suite named by backend and kernel)")
    run.add_argument("--json", metavar="FILE", help="write the JSON report (what 'report' compares)")
    run.add_argument("-k", metavar="EXPR", help="run only tests matching a pytest -k expression")
    run.add_argument("--fault", action="append", default=[], metavar="RULE",
                     help="fail kernel calls on the fake, e.g. 'ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY' (repeatable)")
    run.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    run.set_defaults(func=cmd_run, command_parser=run)
    dev = sub.add_parser("devices", help="list what a backend offers",
                         description="List the PCI devices a backend offers, with ids, model, IOMMU group and driver.")
    dev.add_argument("--backend", choices=("fake", "real"), default="fake", help="fake (default) or real")
    dev.add_argument("--device", action="append", default=[], metavar="BDF|SYSFS",
                     help="check and list only this device (repeatable)")
    from fakekernel.topology import DEFAULT_TOPOLOGY

    dev.add_argument("--topology", default=DEFAULT_TOPOLOGY,
                     help=f"fake kernel topology (default: {DEFAULT_TOPOLOGY}, the CI VM's devices)")
    dev.set_defaults(func=cmd_devices, command_parser=dev)
    rep = sub.add_parser("report", help="compare runs side by side",
                         description="Compare two or more 'run --json' files test by test. Exit 1 on a divergence, "
                                     "5 if a run passed nothing, 4 if a file cannot be read or written.")
    rep.add_argument("first", metavar="JSON", help="a run's --json file, e.g. fake.json")
    rep.add_argument("others", nargs="+", metavar="JSON", help="more runs to compare with it, e.g. real.json")
    rep.add_argument("--html", metavar="FILE", help="also write the matrix as a static HTML page")
    rep.set_defaults(func=cmd_report, command_parser=rep)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    top = parser()
    args, unknown = top.parse_known_args(argv)
    chosen = args.command_parser
    if unknown:
        chosen.error(f"unrecognized arguments: {' '.join(unknown)}"
                     + ("; pytest options go after --" if args.command == "run" else ""))
    if passthrough and args.command != "run":
        chosen.error("only 'run' passes arguments after -- to pytest")
    args.pytest_args = passthrough
    try:
        return args.func(args)
    except CommandError as e:
        print(f"vfio-conformance {args.command}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"vfio-conformance {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
