"""The command-line tools, run in-process on the fake kernel."""

import json

from conformance import cli
from vfio_impl import info


def test_vfio_info_on_the_fake(capsys):
    assert info.main(["--backend", "fake", "0000:00:03.0"]) == 0
    out = capsys.readouterr().out
    assert "flags PCI, 9 regions, 5 irqs" in out
    assert "region 0 (BAR0): size 0x100000" in out and "READ|WRITE|MMAP" in out
    assert "irq 0 (INTx): count 1 flags EVENTFD|MASKABLE|AUTOMASKED" in out
    assert "0000:00:03.0 driver vfio-pci" in out and "IovaRangeCap" in out


def test_vfio_info_reports_a_missing_device(capsys):
    assert info.main(["--backend", "fake", "0000:00:09.0"]) == 1
    assert "no such host device" in capsys.readouterr().err


def test_devices_lists_the_topology(capsys):
    assert cli.main(["devices", "--topology", "nonviable"]) == 0
    out = capsys.readouterr().out
    assert "0000:01:00.0  1234:11e8  edu               5      vfio-pci" in out
    assert "edu-host-driver" in out


def test_run_writes_json_and_a_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    out = tmp_path / "r.json"
    junit = tmp_path / "r.xml"
    code = cli.main(["run", "--json", str(out), "--junit", str(junit), "-k", "test_api_version or bar0_info"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "fake" and report["summary"]["passed"] == 2
    assert {t["area"] for t in report["tests"]} == {"api", "region"}
    assert junit.exists()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["total", "2", "0", "0"] in rows


def test_summary_lists_skip_reasons():
    report = {"backend": "real", "kernel": "6.1", "summary": {"passed": 0, "failed": 0, "skipped": 1},
              "tests": [{"id": "a", "area": "api", "outcome": "skipped", "reason": "no edu"}]}
    table = cli.summary_table(report)
    assert ["api", "0", "0", "1"] in [line.split() for line in table.splitlines()]
    assert "  no edu" in table
