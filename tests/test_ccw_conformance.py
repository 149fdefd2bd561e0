"""The suite's side of vfio-ccw: how a vfio-ccw mdev is named, described and checked before a run,
the probe's ccw section replayed on the fake's mirror of the s390x CI guest, and the command lines
the s390x runner uses, on the fake's equivalent of the guest's mdev."""

import json

import pytest

from conformance import cli, probe
from conformance.backends import DeviceError, check_device, check_named, describe, is_ccw_name, vfio_bound
from conformance.ccw_models import ROLES, model_of
from fakekernel import FakeKernel
from fakekernel.topology import GUEST_MDEV_UUID
from vfio_impl.uapi.css import SenseID

MDEV = f"/sys/bus/mdev/devices/{GUEST_MDEV_UUID}"


@pytest.fixture
def k():
    with FakeKernel("ccw") as kernel:
        yield kernel


@pytest.fixture(autouse=True)
def no_autoload(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.mark.parametrize("name", [MDEV, GUEST_MDEV_UUID, f"/sys/bus/css/devices/0.0.0001/{GUEST_MDEV_UUID}"])
def test_an_mdev_is_described_by_its_uuid_in_its_group(k, name):
    info = describe(k, name)
    assert (info.bdf, info.bus, info.model, info.group, info.driver) == \
        (GUEST_MDEV_UUID, "ccw", "vfio_ccw-io", 0, "vfio_ccw_mdev")
    assert info.group_path == "/dev/vfio/0" and check_device(k, name).bdf == GUEST_MDEV_UUID


def test_every_vfio_ccw_mdev_is_offered(k):
    mdevs = [d for d in vfio_bound(k) if d.bus == "ccw"]
    assert len(mdevs) == len(k.topology.ccw) and GUEST_MDEV_UUID in {d.bdf for d in mdevs}


def test_an_mdev_of_a_subchannel_no_longer_on_vfio_ccw_is_refused(k):
    k.fs.remove_object("/sys/devices/css0/0.0.0001/driver")
    with pytest.raises(DeviceError, match=r"not an mdev of an I/O subchannel bound to vfio_ccw \(0.0.0001 is bound "
                                          r"to no driver\); bind the subchannel"):
        check_device(k, MDEV)


def test_naming_the_subchannel_points_at_its_mdev(k):
    with pytest.raises(DeviceError, match=f"an I/O subchannel, which VFIO does not open; name the vfio-ccw mdev "
                                          f"created on it \\({MDEV}\\)"):
        check_device(k, "/sys/bus/css/devices/0.0.0001")


def test_a_ccw_name_is_checked_on_the_fakes_ccw_topology():
    assert [d.bdf for d in check_named("fake", [MDEV, GUEST_MDEV_UUID])] == [GUEST_MDEV_UUID] * 2
    assert is_ccw_name(GUEST_MDEV_UUID) and is_ccw_name("/sys/devices/css0/0.0.0001") and not is_ccw_name("00:03.0")


def test_models_are_told_by_their_sense_id():
    virtio = model_of(SenseID(cu_type=0x3832, cu_model=2))
    store = model_of(SenseID(cu_type=0xFAC3, cu_model=1, dev_type=0xFAC3, dev_model=1))
    assert (virtio.name, virtio.capacity, store.name) == ("virtio-blk-ccw", 16384, "ccw-block")
    assert model_of(SenseID(cu_type=0x3832, cu_model=1)) is None
    assert [role for role, (_, fits) in ROLES.items() if fits(virtio)] == ["any", "identified", "virtio", "virtio-blk"]
    assert [role for role, (_, fits) in ROLES.items() if fits(store)] == ["any", "identified", "store"]
    assert [role for role, (_, fits) in ROLES.items() if fits(None)] == ["any"]


# -- the probe --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replayed():
    return probe.replay_on_fake([MDEV])


def answer(replayed, key):
    return replayed[f"{GUEST_MDEV_UUID} {key}"]["ok"]


def test_the_probe_reads_the_guests_device_info_and_regions(replayed):
    assert {k: answer(replayed, "DEVICE_GET_INFO")[k] for k in ("flags", "num_regions", "num_irqs")} == \
        {"flags": 0x11, "num_regions": 4, "num_irqs": 3}
    regions = [answer(replayed, f"REGION_INFO[{i}] argsz=64") for i in range(4)]
    assert [(r["flags"], r["size"], r["offset"]) for r in regions] == \
        [(0x3, 124, 0), (0xB, 8, 0x400), (0x9, 52, 0x800), (0x9, 8, 0xC00)]
    assert [r.get("caps") for r in regions] == [None] + [[{"cap": "RegionTypeCap", "type": 2, "subtype": s}]
                                                         for s in (1, 2, 3)]
    info = replayed["ccw container.IOMMU_GET_INFO argsz=512"]["ok"]
    assert (info["flags"], info["iova_pgsizes"]) == (0x3, 0xFFFFFFFFFFFFF000)
    assert [c["cap"] for c in info["caps"]] == ["MigrationCap", "DmaAvailCap"]


def test_the_probe_runs_the_guests_programs(replayed):
    sense_id = answer(replayed, "SENSE ID")
    assert (sense_id["written"], sense_id["ret_code"], sense_id["interrupts"]) == (124, 0, 1)
    assert sense_id["data"].startswith("ff383202") and sense_id["irb"]["scsw"] == \
        {"flags": 0x0080, "ctrl": 0x4007, "cpa": "0x100008", "dstat": 0x0C, "cstat": 0, "count": 0}
    chained = answer(replayed, "NOOP, TIC, READ_CONF 8")
    assert chained["irb"]["scsw"]["cpa"] == "0x100208" and chained["data"] == "0000000000004000"
    clear = answer(replayed, "CSCH through the async region")
    assert clear["irb"]["scsw"]["ctrl"] == 0x1001 and clear["irb"]["scsw"]["cpa"] == "elsewhere"
    schib = answer(replayed, "schib region after open")["pmcw"]
    assert (schib["flags"], schib["devno"], schib["pim"], schib["intparm"]) == (0x1881, 1, 0x80, True)


def test_compare_takes_the_guests_mdev_under_any_uuid(tmp_path, capsys, replayed):
    uuid = "0f0e0d0c-0b0a-0908-0706-050403020100"
    recorded = {"kernel": {"ok": "6.1.0-s390x"}} | {k.replace(GUEST_MDEV_UUID, uuid): v for k, v in replayed.items()}
    recorded["devices"] = {"ok": {uuid: "vfio_ccw-io"}}
    path = tmp_path / "s390x.json"
    path.write_text(json.dumps(recorded))
    assert probe.main(["compare", str(path)]) == 0
    assert "0 disagree" in capsys.readouterr().out


# -- the runner's command line ------------------------------------------------------------------
def test_the_runners_run_on_the_fakes_mirror_of_its_mdev(tmp_path):
    out, junit = tmp_path / "ccw.json", tmp_path / "ccw.xml"
    argv = ["run", "--backend", "fake", "--destructive", "--device", MDEV, "--json", str(out), "--junit", str(junit),
            "-k", "test_ccw and (sense_id_names or chained_noop or device_info_regions)"]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["passed"] == 3 and report["devices"] == [GUEST_MDEV_UUID] and junit.exists()
