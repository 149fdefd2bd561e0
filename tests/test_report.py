"""`vfio-conformance report`: the divergence rules, and the HTML page as a real browser sees it."""

import json
import subprocess
from html.parser import HTMLParser

import pytest

from conformance import cli
from conformance.report import Matrix, load_runs, render_html



def write_run(path, backend, kernel, outcomes, **about):
    """A run --json file; `outcomes` maps test id to an outcome, (outcome, reason) or
    (outcome, reason, skip kind)."""
    tests = []
    for test, result in outcomes.items():
        outcome, reason, *kind = result if isinstance(result, tuple) else (result, "")
        area = test.split("::")[0].rsplit("/", 1)[-1].removeprefix("test_").removesuffix(".py")
        tests.append({"id": test, "area": area, "outcome": outcome, "reason": reason, **({"skip": kind[0]} if kind else {})})
    summary = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    path.write_text(json.dumps({"backend": backend, "kernel": kernel, "summary": summary, "tests": tests, **about}))
    return str(path)


API = "conformance/areas/test_api.py::"
DMA = "conformance/areas/test_dma.py::"
TOPOLOGY_SKIP = ("skipped", "real backend: needs the fake kernel's 'nonviable' topology", "runner")
NO_VFIO = ("skipped", "real backend: /dev/vfio/vfio is absent, this kernel has no VFIO", "backend")


@pytest.fixture
def runs(tmp_path):
    """Builds fake.json and real.json in tmp_path from two outcome maps."""
    def build(fake, real, **fake_about):
        return [write_run(tmp_path / "fake.json", "fake", "fake 6.1", fake, **fake_about),
                write_run(tmp_path / "real.json", "real", "6.1.0-56-amd64", real)]
    return build


def test_agreeing_runs_exit_0_and_real_only_skips_are_not_divergences(runs, capsys):
    paths = runs({API + "test_api_version": "passed", API + "test_nonviable_group_message": "passed"},
                 {API + "test_api_version": "passed", API + "test_nonviable_group_message": TOPOLOGY_SKIP})
    assert cli.main(["report", *paths]) == 0
    out = capsys.readouterr().out
    assert "real-only skip: 1" in out and "DIVERGES" not in out
    assert out.splitlines()[-1] == "divergences: 0"
    row = next(r for r in Matrix(load_runs(paths)).rows if r.test.endswith("nonviable_group_message"))
    assert row.states == ["passed", "real-only skip"] and not row.divergence


def test_a_failure_on_one_backend_is_a_divergence_naming_its_area_and_what_differs(runs, capsys):
    paths = runs({DMA + "test_map_dma": "passed", API + "test_x": "passed"},
                 {DMA + "test_map_dma": ("failed", "assert 16 == 22 (conformance/areas/test_dma.py:40)"), API + "test_x": "passed"})
    assert cli.main(["report", *paths]) == 1
    out = capsys.readouterr().out
    assert (f"DIVERGES [dma] {DMA}test_map_dma: fake passed; real failed: assert 16 == 22 "
            "(conformance/areas/test_dma.py:40)") in out
    assert out.splitlines()[-1] == "divergences: 1"


def test_a_failure_the_other_backend_skipped_is_a_divergence(runs):
    paths = runs({API + "test_nonviable_group_message": ("failed", "assert 16 == 22"), API + "test_x": "passed"},
                 {API + "test_nonviable_group_message": TOPOLOGY_SKIP, API + "test_x": "passed"})
    row = Matrix(load_runs(paths)).rows[0]
    assert row.divergence == f"fake failed: assert 16 == 22; real skipped: {TOPOLOGY_SKIP[1]}"


def test_a_run_that_passed_nothing_is_an_error_not_real_only_skips(runs, capsys):
    """No VFIO on the machine: every real test skipped. That compares nothing (exit 5), and the
    skips are "not run", never "real-only skip"."""
    tests = [API + "test_api_version", API + "test_nonviable_group_message"]
    paths = runs({t: "passed" for t in tests}, {t: NO_VFIO for t in tests})
    assert cli.main(["report", *paths]) == 5
    out = capsys.readouterr().out
    assert f"ERROR real (6.1.0-56-amd64) passed nothing: {NO_VFIO[1]}" in out
    assert "not run: 2" in out and "real-only" not in out
    assert {tuple(r.states) for r in Matrix(load_runs(paths)).rows} == {("passed", "not run")}


def test_a_fake_skip_where_real_passes_is_a_divergence(runs, capsys):
    paths = runs({DMA + "test_ivshmem_bar2": ("skipped", "fake backend: no ivshmem device bound to vfio-pci"),
                  API + "test_x": "passed"},
                 {DMA + "test_ivshmem_bar2": "passed", API + "test_x": "passed"})
    assert cli.main(["report", *paths]) == 1
    assert "real passes, the fake does not cover it" in capsys.readouterr().out


def test_absent_tests(runs):
    """Real may lack a test the fake runs; the fake may not lack one real passes."""
    paths = runs({API + "test_fake_only": "passed"}, {API + "test_real_only": "passed"})
    rows = {r.test: r for r in Matrix(load_runs(paths)).rows}
    assert rows[API + "test_fake_only"].states == ["passed", "absent"]
    assert not rows[API + "test_fake_only"].divergence
    assert rows[API + "test_real_only"].states == ["absent", "passed"]
    assert rows[API + "test_real_only"].divergence == "real passes, the fake does not cover it: fake absent"


def test_runs_of_one_backend_are_told_apart_by_file(tmp_path, capsys):
    first = write_run(tmp_path / "bookworm.json", "real", "6.1.0-56-amd64", {API + "test_api_version": "passed"})
    second = write_run(tmp_path / "rerun.json", "real", "6.1.0-56-amd64", {API + "test_api_version": "passed"})
    assert [r.label for r in load_runs([first, second])] == [
        "real (6.1.0-56-amd64) [bookworm.json]", "real (6.1.0-56-amd64) [rerun.json]"]


@pytest.mark.parametrize("content, why", [
    ("{not json", "not JSON"),
    ('{"backend": "real", "tests": []}', "not a conformance report"),
    ('{"backend": "real", "kernel": "6.1", "tests": [{"id": "t", "area": "api", "outcome": "xfail"}]}',
     "bad test entry"),
    (None, "cannot read"),
])
def test_unusable_input_exits_4_naming_the_file(runs, tmp_path, capsys, content, why):
    fake, _ = runs({API + "test_api_version": "passed"}, {})
    broken = tmp_path / "broken-real.json"
    if content is not None:
        broken.write_text(content)
    assert cli.main(["report", fake, str(broken)]) == 4
    err = capsys.readouterr().err
    assert f"vfio-conformance report: {broken}: {why}" in err


def test_one_run_is_a_usage_error_and_usage_says_two(runs, capsys):
    fake, _ = runs({API + "test_api_version": "passed"}, {})
    with pytest.raises(SystemExit) as exit:
        cli.main(["report", fake])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vfio-conformance report [-h] [--html FILE] JSON JSON [JSON ...]" in err


def test_an_unwritable_page_is_one_line_and_exit_4(runs, capsys):
    paths = runs({API + "test_api_version": "passed"}, {API + "test_api_version": "passed"})
    assert cli.main(["report", *paths, "--html", "/proc/nope/r.html"]) == 4
    assert capsys.readouterr().err == "vfio-conformance report: --html /proc/nope/r.html: directory /proc/nope does not exist\n"


class PageDOM(HTMLParser):
    """What a reviewer sees: the divergence count and, per #matrix row, each run's cell."""

    def __init__(self, dom: str):
        super().__init__()
        self.title = self.text = ""
        self.divergence_count = None
        self.rows: dict[str, list[dict]] = {}
        self._in_matrix = self._in_title = False
        self._row = self._cell = None
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") == "divergences":
            self.divergence_count = int(a["data-count"])
        self._in_matrix |= a.get("id") == "matrix"
        self._in_title |= tag == "title"
        if self._in_matrix and tag == "tr" and "data-test" in a:
            self._row = self.rows[a["data-test"]] = []
        elif self._row is not None and tag == "td":
            self._cell = {"class": a.get("class", "").split(), "title": a.get("title", ""), "text": ""}
            self._row.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_matrix = False
        elif tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        self.text += data
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_title:
            self.title += data


def dump_dom(browser, page, profile) -> str:
    """The DOM after Debian's chromium has loaded the page headless."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        stderr = (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"chromium did not finish in 60 s; stderr ends:\n{stderr[-2000:]}")
    if done.returncode != 0 or "</html>" not in done.stdout:
        pytest.fail(f"chromium exited {done.returncode}; stderr ends:\n{done.stderr[-2000:]}")
    return done.stdout


def test_html_report_in_headless_chromium(runs, tmp_path, capsys, debian_package):
    browser = debian_package("chromium", "chromium")
    reason = 'fake backend: no <ivshmem> "device" & no BAR2'
    fake = {API + "test_api_version": "passed", API + "test_nonviable_group_message": "passed",
            DMA + "test_map_dma": ("failed", "OSError EINVAL: Invalid argument from ioctl VFIO_IOMMU_MAP_DMA"),
            DMA + "test_ivshmem_bar2": ("skipped", reason)}
    real = {API + "test_api_version": "passed", API + "test_nonviable_group_message": TOPOLOGY_SKIP,
            DMA + "test_map_dma": "passed", DMA + "test_ivshmem_bar2": "passed", DMA + "test_unmap_dma": "passed"}
    page = tmp_path / "report.html"
    paths = runs(fake, real, faults=["ioctl:VFIO_IOMMU_MAP_DMA,errno=EINVAL"], host="ci-1", devices=["0000:00:03.0"])
    assert cli.main(["report", *paths, "--html", str(page)]) == 1
    capsys.readouterr()
    dom = PageDOM(dump_dom(browser, page, tmp_path / "chromium-profile"))
    assert "dmatest_map_dma" in dom.text  # the area column, then the test
    assert "fake failed: OSError EINVAL: Invalid argument from ioctl VFIO_IOMMU_MAP_DMA; real passed" in dom.text
    assert "ioctl:VFIO_IOMMU_MAP_DMA,errno=EINVAL" in dom.text and "ci-1" in dom.text and "Error:" not in dom.text
    assert dom.title == "VFIO conformance: fake (fake 6.1) vs real (6.1.0-56-amd64)"
    assert dom.divergence_count == 3
    assert set(dom.rows) == set(real)
    assert all(len(cells) == 2 for cells in dom.rows.values())
    outcome = {test: [c["class"][0] for c in cells] for test, cells in dom.rows.items()}
    assert outcome[DMA + "test_map_dma"] == ["failed", "passed"]
    assert outcome[DMA + "test_unmap_dma"] == ["absent", "passed"]
    fake_cell, real_cell = dom.rows[API + "test_nonviable_group_message"]
    assert real_cell["class"] == ["skipped", "real-only-skip"] and real_cell["title"] == TOPOLOGY_SKIP[1]
    assert real_cell["text"].startswith("real-only skip")
    assert dom.rows[DMA + "test_ivshmem_bar2"][0]["title"] == reason


def test_the_page_says_when_a_run_passed_nothing(runs):
    paths = runs({API + "test_api_version": "passed"}, {API + "test_api_version": NO_VFIO})
    dom = PageDOM(render_html(Matrix(load_runs(paths))))
    assert f"Error: real (6.1.0-56-amd64) passed nothing: {NO_VFIO[1]}." in dom.text
    assert "None: every test real passes" not in dom.text and "real-only" not in str(dom.rows)


def test_four_runs_of_two_kernels_are_two_comparisons(tmp_path, capsys):
    """fake 6.1 | real 6.1 | fake 6.12 | real 6.12: each real run answers to the fake of its
    kernel, so a test 6.12 changed is no divergence against 6.1, and the columns come in that order."""
    msix = "conformance/areas/test_msix.py::test_dynamic"
    paths = [write_run(tmp_path / "real-6.12.json", "real", "6.12.118+deb12-amd64", {msix: "passed", API + "x": "passed"}),
             write_run(tmp_path / "fake-6.1.json", "fake", "fake 6.1", {msix: ("failed", "EINVAL"), API + "x": "passed"}),
             write_run(tmp_path / "real-6.1.json", "real", "6.1.0-57-amd64", {msix: ("failed", "EINVAL"), API + "x": "passed"}),
             write_run(tmp_path / "fake-6.12.json", "fake", "fake 6.12", {msix: ("failed", "assert 1 == 5"),
                                                                          API + "x": "passed"})]
    matrix = Matrix(load_runs(paths))
    assert [r.label for r in matrix.runs] == ["fake (fake 6.1)", "real (6.1.0-57-amd64)", "fake (fake 6.12)",
                                              "real (6.12.118+deb12-amd64)"]
    (row,) = matrix.divergences
    assert row.divergence == "[6.12] fake failed: assert 1 == 5; real passed"
    assert cli.main(["report", *paths]) == 1
    assert f"DIVERGES [msix] {msix}: [6.12] fake failed: assert 1 == 5; real passed" in capsys.readouterr().out


def test_a_real_kernel_no_fake_models_answers_to_the_fake(tmp_path):
    paths = [write_run(tmp_path / "fake.json", "fake", "fake 6.1", {API + "x": "passed"}),
             write_run(tmp_path / "lab.json", "real", "5.15.0-91-generic", {API + "x": ("failed", "EIO")})]
    assert Matrix(load_runs(paths)).divergences[0].divergence == "fake passed; real failed: EIO"
