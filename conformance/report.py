"""Side-by-side matrix of conformance runs: where the fake and a real kernel disagree.

The real kernel is the oracle, so a divergence is any failure the other runs do not share, or a
test real passes that the fake skips or lacks. A real skip where the fake passes is shown but
not counted: a "real-only skip" when the real runner cannot build what the test needs (a fake
topology, fake internals), "not run" when the machine lacked VFIO, the device, or leave to be
destructive. A run that passed nothing is an error of its own: it compared nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

OUTCOMES = ("passed", "failed", "skipped")
ABSENT = "absent"


class ReportError(Exception):
    """A report file that cannot be compared; the message names the file."""


@dataclass(slots=True)
class Run:
    """One conformance JSON report: a column of the matrix."""

    path: Path
    backend: str
    kernel: str
    tests: dict[str, dict]
    label: str = ""
    host: str = ""
    devices: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    verdict: str = ""
    profile: str = ""

    def count(self, outcome: str) -> int:
        return sum(1 for t in self.tests.values() if t["outcome"] == outcome)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list) \
            or not all(isinstance(data.get(k), str) for k in ("backend", "kernel")):
        raise ReportError(f"{path}: not a conformance report (needs backend, kernel and tests)")
    tests: dict[str, dict] = {}
    for entry in data["tests"]:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("id", "area")) \
                or entry.get("outcome") not in OUTCOMES:
            raise ReportError(f"{path}: bad test entry {entry!r:.120}")
        if entry["id"] in tests:
            raise ReportError(f"{path}: test {entry['id']} is reported twice")
        tests[entry["id"]] = {**entry, "reason": str(entry.get("reason") or "")}
    run = Run(path, data["backend"], data["kernel"], tests, host=str(data.get("host") or ""),
              profile=str(data.get("profile") or _profile_of(data["backend"], data["kernel"])),
              devices=[str(d) for d in data.get("devices") or []], faults=[str(f) for f in data.get("faults") or []])
    if not run.count("passed"):
        reasons = Counter(t["reason"] for t in tests.values() if t["outcome"] == "skipped")
        run.verdict = "passed nothing" + (f": {reasons.most_common(1)[0][0]}" if reasons else "")
    return run


def _profile_of(backend: str, kernel: str) -> str:
    """The kernel generation of a report that does not name its profile: `fake 6.1` -> 6.1,
    `6.1.0-57-amd64` -> 6.1."""
    if backend == "fake":
        return kernel.removeprefix("fake ")
    return ".".join(kernel.split(".")[:2])


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Loads and labels the runs; two runs of one backend and kernel are told apart by file."""
    if len(paths) < 2:
        raise ReportError("a report compares two or more runs, e.g. fake.json real.json")
    runs = [load_run(p) for p in paths]
    labels = Counter(f"{r.backend} ({r.kernel})" for r in runs)
    names = Counter(r.path.name for r in runs)
    for r in runs:
        r.label = f"{r.backend} ({r.kernel})"
        if labels[r.label] > 1:
            r.label += f" [{r.path.name if names[r.path.name] == 1 else r.path}]"
    return runs


@dataclass(slots=True)
class Row:
    """One test across all runs; `cells` holds its entry per run, None where absent."""

    test: str
    area: str
    cells: list[dict | None]
    states: list[str] = field(default_factory=list)
    divergence: str = ""

    def outcome(self, i: int) -> str:
        cell = self.cells[i]
        return cell["outcome"] if cell else ABSENT

    def reason(self, i: int) -> str:
        cell = self.cells[i]
        return cell["reason"] if cell else ""


class Matrix:
    """Test id x run, with each row's divergence judged against the real-is-the-oracle rules,
    kernel by kernel: a real run answers to the fake runs of its kernel's profile (or to every
    fake run when no fake models its kernel), so fake 6.1, real 6.1, fake 6.12 and real 6.12 make
    two comparisons side by side, not one of four."""

    def __init__(self, runs: list[Run]):
        self.groups = _kernel_groups(runs)
        self.runs = [r for group in self.groups.values() for r in group]
        ids = set().union(*(r.tests for r in self.runs))
        rows = []
        for test in ids:
            cells = [r.tests.get(test) for r in self.runs]
            area = next(c["area"] for c in cells if c)
            rows.append(self._judge(Row(test, area, cells)))
        self.rows = sorted(rows, key=lambda row: (row.area, row.test))

    @property
    def divergences(self) -> list[Row]:
        return [row for row in self.rows if row.divergence]

    @property
    def empty_runs(self) -> list[Run]:
        """Runs that tested nothing; comparing against them proves nothing."""
        return [r for r in self.runs if r.verdict]

    def absent(self, i: int) -> int:
        return sum(1 for row in self.rows if row.cells[i] is None)

    def areas(self) -> dict[str, list[Row]]:
        grouped: dict[str, list[Row]] = {}
        for row in self.rows:
            grouped.setdefault(row.area, []).append(row)
        return grouped

    def _judge(self, row: Row) -> Row:
        row.states = [""] * len(self.runs)
        found = []
        for kernel, group in self.groups.items():
            where = [self.runs.index(r) for r in group]
            outcomes = [row.outcome(i) for i in where]
            on = {kind: [row.outcome(i) for i in where if self.runs[i].backend == kind] for kind in ("fake", "real")}
            said = ""
            if "failed" in outcomes and len(set(outcomes)) > 1:
                said = "; ".join(self._says(row, i) for i in where)
            elif "passed" in on["real"] and ({"skipped", ABSENT} & set(on["fake"])):
                said = "real passes, the fake does not cover it: " + "; ".join(
                    self._says(row, i) for i in where if self.runs[i].backend == "fake")
            if said:
                found.append(f"[{kernel}] {said}" if len(self.groups) > 1 else said)
            for i in where:
                row.states[i] = self._state(row, i, "passed" in on["fake"])
        row.divergence = " | ".join(found)
        return row

    def _says(self, row: Row, i: int) -> str:
        """`fake passed`, `real failed: assert 16 == 22`: one run's side of a divergence."""
        reason = row.reason(i)
        return f"{self.runs[i].backend} {row.outcome(i)}" + (f": {reason}" if reason else "")

    def _state(self, row: Row, i: int, fake_passes: bool) -> str:
        run, cell = self.runs[i], row.cells[i]
        if not (fake_passes and run.backend == "real" and row.outcome(i) == "skipped"):
            return row.outcome(i)
        return "real-only skip" if cell.get("skip") == "runner" else "not run"


def _kernel_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by the kernel profile they answer to, fake runs first in each; a real run whose kernel
    no fake run models joins the first group."""
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.backend != "fake"):
        key = run.profile if run.profile in groups or run.backend == "fake" else next(iter(groups), run.profile)
        groups.setdefault(key or run.kernel, []).append(run)
    return groups


def format_text(matrix: Matrix) -> str:
    """Per-run totals, then each divergence with every run's outcome and reason."""
    width = max(len(r.label) for r in matrix.runs)
    lines = []
    for i, r in enumerate(matrix.runs):
        lines.append(f"{r.label:<{width}}  {r.count('passed'):>4} passed {r.count('failed'):>4} failed "
                     f"{r.count('skipped'):>4} skipped {matrix.absent(i):>4} absent   {r.path}")
        if r.faults:
            lines.append(f"  faults injected: {'; '.join(r.faults)}")
    for r in matrix.empty_runs:
        lines.append(f"ERROR {r.label} {r.verdict}")
    for state, why in (("real-only skip", "the real runner cannot build what they need; not divergences"),
                       ("not run", "the real machine lacked VFIO, the device or --destructive; not divergences")):
        count = sum(row.states.count(state) for row in matrix.rows)
        if count:
            lines.append(f"{state}: {count} ({why})")
    for row in matrix.divergences:
        lines.append(f"DIVERGES [{row.area}] {row.test}: {row.divergence}")
    lines.append(f"divergences: {len(matrix.divergences)}")
    return "\n".join(lines)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
thead th { background: #eee; position: sticky; top: 0; }
td.num { text-align: right; }
tr.area th { background: #dde6f0; }
tr.divergent th { border-left: 4px solid #c00; }
.passed { background: #e3f5e1; }
.failed { background: #f9d6d5; font-weight: bold; }
.skipped { background: #fff4cc; }
.real-only-skip, .not-run { background: #f0f0f0; color: #555; }
.error { background: #f9d6d5; border: 2px solid #c00; padding: 0.5em 1em; }
.absent { background: #fff; color: #999; font-style: italic; }
small { display: block; color: #555; font-weight: normal; max-width: 40em; }
code { font-size: 13px; }
"""


def _cell(row: Row, i: int) -> str:
    state = row.states[i]
    cls = row.outcome(i) + (f" {state.replace(' ', '-')}" if state in ("real-only skip", "not run") else "")
    reason = escape(row.reason(i))
    note = f"<small>{reason}</small>" if reason else ""
    return f'<td class="{cls}" title="{reason}">{escape(state)}{note}</td>'


def _test_row(matrix: Matrix, row: Row, extra: str = "", area: bool = False) -> str:
    cls = ' class="divergent"' if row.divergence else ""
    name = row.test.split("::", 1)[-1]
    cells = "".join(_cell(row, i) for i in range(len(matrix.runs)))
    area_cell = f"<td>{escape(row.area)}</td>" if area else ""
    return (f'<tr data-test="{escape(row.test)}" data-area="{escape(row.area)}"{cls}>{area_cell}'
            f'<th scope="row" title="{escape(row.test)}"><code>{escape(name)}</code></th>{cells}{extra}</tr>')


def render_html(matrix: Matrix) -> str:
    """One static page, no scripts or external resources, so CI can archive it as is."""
    runs = matrix.runs
    title = "VFIO conformance: " + " vs ".join(r.label for r in runs)
    heads = "".join(f"<th>{escape(r.label)}</th>" for r in runs)
    summary = []
    for i, r in enumerate(runs):
        nums = "".join(f'<td class="num {k if n else ""}">{n}</td>' for k, n in
                       [(o, r.count(o)) for o in OUTCOMES] + [(ABSENT, matrix.absent(i))])
        about = "".join(f"<td>{escape(text)}</td>" for text in
                        (r.host, ", ".join(r.devices), "; ".join(r.faults) or "none"))
        summary.append(f"<tr><th>{escape(r.label)}</th><td><code>{escape(str(r.path))}</code></td>{nums}{about}</tr>")
    errors = "".join(f'<p class="error" data-run="{escape(r.label)}">Error: {escape(r.label)} {escape(r.verdict)}. '
                     "It tested nothing, so this comparison proves nothing.</p>" for r in matrix.empty_runs)
    divergent = matrix.divergences
    if divergent:
        body = "".join(_test_row(matrix, row, f"<td>{escape(row.divergence)}</td>", area=True) for row in divergent)
        div_body = (f"<table><thead><tr><th>area</th><th>test</th>{heads}<th>why</th></tr></thead>"
                    f"<tbody>{body}</tbody></table>")
    elif matrix.empty_runs:
        div_body = "<p>None counted, but a run passed nothing (above).</p>"
    else:
        div_body = "<p>None: every test real passes, the fake passes too, and no run fails alone.</p>"
    groups = []
    for area, rows in matrix.areas().items():
        trs = "".join(_test_row(matrix, row) for row in rows)
        groups.append(f'<tbody data-area="{escape(area)}"><tr class="area"><th colspan="{len(runs) + 1}">'
                      f"{escape(area)} ({len(rows)} tests)</th></tr>{trs}</tbody>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
{errors}
<h2>Runs</h2>
<table id="summary"><thead><tr><th>run</th><th>file</th><th>passed</th><th>failed</th><th>skipped</th>
<th>absent</th><th>host</th><th>devices</th><th>faults injected</th></tr></thead><tbody>{''.join(summary)}</tbody></table>
<section id="divergences" data-count="{len(divergent)}">
<h2>Divergences: {len(divergent)}</h2>
{div_body}
</section>
<h2>Matrix</h2>
<p>A real-only skip is a test the real runner cannot set up (a fake-only topology or fake
internals) while the fake passes it; "not run" is one the real machine skipped for want of VFIO,
the device, or leave to be destructive. Neither is a divergence. Absent: the run has no such test.</p>
<table id="matrix"><thead><tr><th>test</th>{heads}</tr></thead>
{''.join(groups)}
</table>
</body></html>
"""
