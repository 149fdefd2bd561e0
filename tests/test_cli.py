"""The command-line tools as a new user meets them: exit codes, one-line errors, the run's report."""

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conformance import cli
from conformance.backends import DeviceError, check_device, check_named
from fakekernel import FakeKernel, Topology
from vfio_impl import info

SUITE_PICK = "test_api_version or bar0_info"
NO_VFIO = not os.path.exists("/dev/vfio/vfio")


@pytest.fixture(autouse=True)
def no_autoload(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def one_line(text: str) -> str:
    """The error a user sees: exactly one line, no traceback."""
    assert "Traceback" not in text and text.count("\n") == 1, text
    return text.strip()


def test_vfio_info_on_the_fake(capsys):
    assert info.main(["00:03.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backend: fake, topology vm\n0000:00:03.0 1234:11e8: flags PCI, 9 regions, 5 irqs")
    assert "region 0 (BAR0): size 0x100000" in out and "READ|WRITE|MMAP" in out
    assert "irq 0 (INTx): count 1 flags EVENTFD|MASKABLE|AUTOMASKED" in out
    assert "region 8 (VGA): not present" in out and "irq 3 (ERR): not present" in out
    assert "capabilities:\n    [40] MSI\n" in out
    assert "0000:00:03.0 driver vfio-pci" in out and "IovaRangeCap" in out


def test_vfio_info_lists_pcie_capabilities(capsys):
    assert info.main(["--backend", "fake", "0000:01:00.0"]) == 0
    out = capsys.readouterr().out
    assert "[e0] PCI Express" in out and "[100] Advanced Error Reporting" in out and "irq 3 (ERR): count 1" in out


def test_vfio_info_reports_a_missing_device(capsys):
    assert info.main(["--backend", "fake", "0000:00:09.0"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "no such host device" in err and "--backend real" in err


@pytest.mark.parametrize("argv, why", [
    (["--topology", "nosuch", "00:03.0"], "--topology: unknown topology 'nosuch'; known: ccw, default"),
    (["not-a-bdf"], "'not-a-bdf' is not a PCI address"),
])
def test_vfio_info_usage_errors(capsys, argv, why):
    with pytest.raises(SystemExit) as exit:
        info.main(argv)
    assert exit.value.code == 2 and why in capsys.readouterr().err


def test_devices_lists_the_topology(capsys):
    assert cli.main(["devices", "--topology", "nonviable"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backend: fake (fake 6.1), topology nonviable\n")
    assert "0000:01:00.0  1234:11e8  edu               5           vfio-pci" in out
    assert "edu-host-driver" in out


def test_devices_lists_platform_and_amba_devices_with_their_no_iommu_groups(capsys):
    assert cli.main(["devices", "--topology", "platform"]) == 0
    out = capsys.readouterr().out
    assert "9010000.pl031           amba       pl031             noiommu-0   vfio-amba" in out
    assert "a000000.virtio_mmio     platform   virtio-mmio       noiommu-2   vfio-platform" in out


def test_a_platform_device_is_checked_on_the_fakes_platform_topology(capsys):
    assert cli.main(["devices", "--device", "9010000.pl031"]) == 3
    assert "vfio-conformance devices: --device 9010000.pl031:" in capsys.readouterr().err
    info = check_named("fake", ["9010000.pl031", "a000000.virtio_mmio"])
    assert [(d.bus, d.model, d.group_path) for d in info] == [("amba", "pl031", "/dev/vfio/noiommu-0"),
                                                             ("platform", "virtio-mmio", "/dev/vfio/noiommu-2")]


@pytest.mark.parametrize("argv, status, why", [
    (["devices", "--topology", "nosuch"], 2, "vfio-conformance devices: --topology: unknown topology 'nosuch'"),
    (["devices", "--device", "0000:99:00.0"], 3,
     "vfio-conformance devices: --device 0000:99:00.0: no such device: /sys/bus/pci/devices/0000:99:00.0 does not exist"),
    (["run", "--device", "not-a-bdf"], 3, "--device not-a-bdf: 'not-a-bdf' is not a PCI address"),
    (["run", "--device", "0000:99:00.0"], 3, "--device 0000:99:00.0: no such device"),
    (["run", "--json", "/proc/nope/x.json"], 4, "vfio-conformance run: --json /proc/nope/x.json: directory /proc/nope does not exist"),
    (["run", "--junit", "/"], 4, "--junit /: is a directory"),
    (["run", "--fault", "open,errno=EMFILE", "--backend", "real"], 2,
     "--fault injects faults into the fake kernel; it needs --backend fake"),
    (["run", "--kernel", "9.9"], 2, "vfio-conformance run: --kernel: unknown kernel profile '9.9'; known: 6.1"),
    (["run", "--kernel", "6.1", "--backend", "real"], 2, "--kernel picks the fake kernel's profile"),
])
def test_user_errors_are_one_line_with_their_own_status_before_any_test(capsys, argv, status, why):
    assert cli.main(argv) == status
    out = capsys.readouterr()
    assert why in one_line(out.err) and "passed" not in out.out


def test_a_device_that_cannot_be_tested_is_named_with_the_reason():
    with FakeKernel(Topology.named("nonviable")) as kernel:
        with pytest.raises(DeviceError, match=r"0000:01:01.0 is bound to edu-host-driver, not vfio-pci; bind it"):
            check_device(kernel, "01:01.0")
        with pytest.raises(DeviceError, match=r"IOMMU group 5 is not viable: 0000:01:01.0 \(bound to "
                                              r"edu-host-driver\) must be bound to vfio-pci or unbound"):
            check_device(kernel, "0000:01:00.0")


@pytest.mark.parametrize("argv, why", [
    (["run", "--bogus"], "usage: vfio-conformance run [options] [-- PYTEST_ARGS ...]"),
    (["run", "-n", "-3"], "argument -n: -3 workers: give 0 (no xdist) or more"),
    (["devices", "--", "-x"], "only 'run' passes arguments after -- to pytest"),
])
def test_a_refused_flag_prints_its_commands_usage(capsys, argv, why):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2 and why in capsys.readouterr().err


def test_versions_and_help(capsys):
    for main in (cli.main, info.main):
        with pytest.raises(SystemExit) as exit:
            main(["--version"])
        assert exit.value.code == 0
    assert capsys.readouterr().out.splitlines() == ["vfio-conformance 0.1.0", "vfio-info 0.1.0"]
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--backend", "--device", "--destructive", "-n N", "--junit", "--json", "-k EXPR", "--fault",
                   "--verbose", "-- PYTEST_ARGS"):
        assert option in help_text


def test_run_writes_json_junit_and_a_table(tmp_path, capsys):
    out, junit = tmp_path / "r.json", tmp_path / "r.xml"
    assert cli.main(["run", "--kernel", "6.1", "--json", str(out), "--junit", str(junit), "-k", SUITE_PICK]) == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "fake" and report["kernel"] == "fake 6.1" and report["profile"] == "6.1"
    assert report["summary"]["passed"] == 2 and report["exitstatus"] == 0
    assert report["devices"] == ["0000:00:03.0"] and report["host"] and report["host_kernel"] == os.uname().release
    assert {t["area"] for t in report["tests"]} == {"api", "region"}
    assert all(t["duration"] > 0 and t["devices"] == ["0000:00:03.0"] for t in report["tests"])
    (suite,) = ET.parse(junit).getroot()
    assert suite.get("name") == "vfio-conformance[fake 6.1]"
    text = capsys.readouterr().out
    assert ["total", "2", "0", "0"] in [line.split() for line in text.splitlines()]
    assert "devices tested: 0000:00:03.0" in text and "fuzz" not in text


def test_a_failure_reason_carries_the_errno_and_the_kernel_call(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["run", "--json", str(out), "-k", "test_bar0_info",
                     "--fault", "ioctl:VFIO_DEVICE_GET_REGION_INFO,errno=EIO,times=all"]) == 1
    (test,) = json.loads(out.read_text())["tests"]
    assert test["outcome"] == "failed"
    assert test["reason"].startswith("VFIOError EIO: ") or test["reason"].startswith("OSError EIO: ")
    assert "VFIO_DEVICE_GET_REGION_INFO" in test["reason"] and "(conformance/" in test["reason"]
    assert f"{test['id']}: {test['reason']}" in capsys.readouterr().out


def test_pytest_options_pass_through_after_a_double_dash(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main(["run", "--json", str(out), "-k", "api", "--fault", "open:/dev/vfio/vfio,errno=EMFILE,times=all",
                     "--", "-x"])
    assert code == 1 and json.loads(out.read_text())["summary"]["failed"] == 1


def test_a_named_device_no_test_passed_on_is_nothing_tested(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["run", "--json", str(out), "--device", "00:04.0", "-k", SUITE_PICK]) == 5
    assert json.loads(out.read_text())["verdict"].startswith("nothing tested: none of 2 VFIO tests passed")
    assert "vfio-conformance: nothing tested" in capsys.readouterr().err


def test_a_named_device_is_all_the_fake_offers(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["run", "--json", str(out), "--device", "00:03.0", "-k", SUITE_PICK]) == 0
    assert json.loads(out.read_text())["devices"] == ["0000:00:03.0"]


@pytest.mark.skipif(not NO_VFIO, reason="this machine has /dev/vfio/vfio; the case needs a machine without VFIO")
def test_a_real_run_with_no_vfio_tested_nothing_and_says_why(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["run", "--backend", "real", "--json", str(out), "-k", SUITE_PICK]) == 5
    assert "nothing tested: none of 2 VFIO tests passed; 2 skipped because: real backend: /dev/vfio/vfio is absent" \
        in one_line(capsys.readouterr().err)
    assert {t["skip"] for t in json.loads(out.read_text())["tests"]} == {"backend"}


def test_summary_lists_skip_reasons_and_failures():
    report = {"backend": "real", "kernel": "6.1", "summary": {"passed": 0, "failed": 1, "skipped": 1},
              "tests": [{"id": "a", "area": "api", "outcome": "skipped", "reason": "no edu"},
                        {"id": "b", "area": "api", "outcome": "failed", "reason": "assert 16 == 22 (x.py:3)"}],
              "interrupted": True}
    table = cli.summary_table(report)
    assert ["api", "0", "1", "1"] in [line.split() for line in table.splitlines()]
    assert "  no edu" in table and "  b: assert 16 == 22 (x.py:3)" in table
    assert table.endswith("interrupted: the table counts only the tests that finished")


def test_ctrl_c_prints_the_partial_table_and_says_interrupted(tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "conformance.cli", "run", "-v", "--json", str(tmp_path / "r.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:
        if " PASSED" in line:
            break
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert "interrupted: the table counts only the tests that finished" in out and "Traceback" not in err
    assert json.loads((tmp_path / "r.json").read_text())["interrupted"] is True


def test_the_junit_file_has_what_the_strictest_consumers_accept(tmp_path):
    """Jenkins xunit's junit-10.xsd: <testcase> holds only results and output (no <properties>),
    <testsuite> needs name, tests, failures and errors. The reliability walks record figures,
    which belong in the JSON, not the XML."""
    junit = tmp_path / "r.xml"
    assert cli.main(["run", "--junit", str(junit), "-k", "reliability and listener or api_version"]) == 0
    check_junit(ET.parse(junit).getroot())


def check_junit(root) -> None:
    results = {"skipped", "error", "failure", "system-out", "system-err",
               "rerunFailure", "rerunError", "flakyFailure", "flakyError"}
    assert root.tag == "testsuites" and set(root.attrib) <= {"name", "time", "tests", "failures", "errors"}
    for suite in root:
        assert suite.tag == "testsuite" and {"name", "tests", "failures", "errors"} <= set(suite.attrib)
        for case in suite:
            assert case.tag in {"testcase", "properties", "system-out", "system-err"}, case.tag
            if case.tag == "testcase":
                assert set(case.attrib) <= {"name", "time", "classname", "group"}, case.attrib
                assert {child.tag for child in case} <= results, [child.tag for child in case]


def test_the_pytest_option_picks_the_fake_kernels_profile(pytester_like_run):
    assert pytester_like_run("--vfio-kernel", "6.1") == 0
    assert pytester_like_run("--vfio-kernel", "9.9") == pytest.ExitCode.USAGE_ERROR


@pytest.fixture
def pytester_like_run(tmp_path):
    """An in-process pytest run of one test that reads the backend's profile."""
    (tmp_path / "test_profile.py").write_text(
        "import pytest\n"
        "@pytest.mark.vfio(device='edu')\n"
        "def test_profile(vfio):\n"
        "    assert vfio.profile.name == vfio.host.profile.name == '6.1'\n")
    return lambda *args: pytest.main([str(tmp_path), "-q", "-p", "conformance.plugin", "-p", "no:cacheprovider", *args])
