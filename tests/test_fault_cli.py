"""Fault injection from the command line and the pytest plugin, and the reliability figures in the
conformance JSON report and its summary table."""

import json
import textwrap

import pytest

from conformance import cli


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")

    def run_cli(*args):
        out = tmp_path / "report.json"
        code = cli.main(["run", "--json", str(out), *args])
        return code, json.loads(out.read_text()) if out.exists() else None, capsys.readouterr()
    return run_cli


def test_a_fault_from_the_command_line_fails_the_tests_that_meet_it(run):
    code, report, out = run("-k", "test_api_version or bar0_info", "--fault",
                            "ioctl:VFIO_GET_API_VERSION,ret=7,times=all")
    assert code == 1 and report["faults"] == ["ioctl:VFIO_GET_API_VERSION,ret=7,times=all"]
    outcomes = {t["id"].split("::")[1]: t["outcome"] for t in report["tests"]}
    assert outcomes == {"test_api_version": "failed", "test_bar0_info": "passed"}
    assert "kernel faults injected: ioctl:VFIO_GET_API_VERSION,ret=7,times=all" in out.out


def test_a_bad_rule_is_a_usage_error(run):
    code, report, out = run("-k", "test_api_version", "--fault", "ioctl:VFIO_GET_API_VERSION,errno=ENOPE")
    assert code != 0 and report is None
    assert "--fault ioctl:VFIO_GET_API_VERSION,errno=ENOPE: fault 'ioctl:VFIO_GET_API_VERSION,errno=ENOPE': unknown errno 'ENOPE'" in out.err


def test_the_report_carries_the_walks_figures(run):
    code, report, out = run("-k", "reliability and listener")
    assert code == 0
    section = report["reliability"]
    paths = {p["path"]: p for p in section["setup_paths"]}
    assert set(paths) == {"group get (new container, listener replay)", "DMA listener (RAM added, then removed)"}
    assert section["injection_points"] == section["injection_points_clean"] == sum(p["points"] for p in paths.values())
    assert section["leaks"] == 0 and section["injection_points"] > 0
    assert f"reliability: {section['injection_points']} injection points" in out.out


def test_a_marker_arms_faults_for_one_test(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    (tmp_path / "test_marker_arms_faults.py").write_text(textwrap.dedent("""
        import errno, pytest
        from vfio_impl import AddressSpace, Device, VFIOError

        @pytest.mark.vfio(device="edu", faults=["open:/dev/vfio/vfio,errno=EMFILE"])
        def test_my_attach_reports_the_open(vfio, vfio_device):
            with AddressSpace(vfio.host) as space, pytest.raises(VFIOError) as e:
                Device.attach(space, vfio_device.sysfs)
            assert e.value.errno == errno.EMFILE and "failed to open /dev/vfio/vfio" in e.value.message

        @pytest.mark.vfio(device="edu")
        def test_the_next_test_has_none(vfio, vfio_device):
            with AddressSpace(vfio.host) as space:
                Device.attach(space, vfio_device.sysfs).close()
    """))
    assert pytest.main([str(tmp_path), "-q", "-p", "conformance.plugin", "-p", "no:cacheprovider"]) == 0


def test_a_faults_marker_skips_on_the_real_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setattr("conformance.backends.real_available", lambda: True)
    (tmp_path / "test_needs_faults_on_real.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.vfio(faults=["open,errno=EMFILE"])
        def test_needs_faults(vfio):
            pass
    """))
    report = tmp_path / "r.json"
    assert pytest.main([str(tmp_path), "-q", "-p", "conformance.plugin", "-p", "no:cacheprovider",
                        "--vfio-backend", "real", f"--vfio-json={report}"]) == pytest.ExitCode.NO_TESTS_COLLECTED
    (test,) = json.loads(report.read_text())["tests"]
    assert test["outcome"] == "skipped" and test["reason"] == "real backend: needs the fake kernel's fault injection"
