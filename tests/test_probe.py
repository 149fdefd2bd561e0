"""Every probe recording in conformance/recordings/, each made on a real kernel in a CI guest (the
x86 VM's vfio-pci devices: linux-PROFILE.json; the arm64 guest's vfio-platform and vfio-amba
devices: linux-arm64-PROFILE.json; the s390x guest's vfio-ccw mdev: linux-s390x-PROFILE.json),
replayed on the fake with that kernel's profile: every
answer must agree."""

import json
from pathlib import Path

import pytest

from conformance import probe
from fakekernel.profile import PROFILES

RECORDINGS = sorted((Path(probe.__file__).parent / "recordings").glob("*.json"))


@pytest.fixture(scope="module", params=RECORDINGS, ids=[path.name for path in RECORDINGS])
def recording(request):
    """(file, answers, the profile its kernel has in the fake)."""
    recorded = probe.load_recording(str(request.param))
    return request.param, recorded, probe.recording_profile(str(request.param), recorded)


def test_the_recordings_are_there():
    assert {"linux-6.1.json", "linux-arm64-6.12.json", "linux-s390x-6.1.json"} <= {path.name for path in RECORDINGS}


# What each guest's recording must cover: its devices, and enough answers under each prefix.
GUESTS = {
    "": ({"edu", "ivshmem", "ivshmem-doorbell", "e1000e"},
         ("container.", "group.", "type1 ", "v1: ", "edu SET_IRQS ", "e1000e SET_IRQS "), 400),
    "arm64-": ({"pl031", "pl061", "virtio-mmio"},
               ("platform container.", "container.CHECK_EXTENSION", "9010000.pl031 SET_IRQS ",
                "a000000.virtio_mmio SET_IRQS ", "9010000.pl031 PL031 "), 150),
    "s390x-": ({"vfio_ccw-io"}, ("ccw ", "container.", "8a1c0bd0-7e7a-4f6a-9c3e-000000000001 "), 100),
}


def test_a_recording_is_named_for_its_guest_and_kernel_and_covers_every_area(recording):
    """A truncated recording would agree vacuously."""
    path, recorded, profile = recording
    guest = next((g for g in GUESTS if path.name == f"linux-{g}{profile.name}.json"), None)
    assert guest is not None, f"{path.name}: not linux-[arm64-]{profile.name}.json"
    models, prefixes, least = GUESTS[guest]
    assert set(recorded["devices"]["ok"].values()) == models
    for prefix in prefixes:
        assert sum(k.startswith(prefix) for k in recorded) >= 5, prefix
    assert len(recorded) > least


def test_fake_kernel_gives_linux_answers(recording):
    _, recorded, profile = recording
    answers = {k: v for k, v in recorded.items() if k != "kernel"}
    found = probe.disagreements(answers, probe.replay_on_fake(list(recorded["devices"]["ok"]), profile))
    assert not found, "\n".join(f"{k}: real {r} fake {f}" for k, r, f in found)


@pytest.mark.parametrize("release, profile", [("6.1.0-56-amd64", "6.1"), ("6.12.118+deb12-amd64", "6.12")])
def test_compare_replays_on_the_profile_of_the_recordings_kernel(tmp_path, monkeypatch, capsys, release, profile):
    """And names each disagreement, real answer then the fake's."""
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"kernel": {"ok": release}, "devices": {"ok": {}},
                                "type1 MAP same iova again": {"errno": "EBUSY"}}))
    replays = []
    monkeypatch.setattr(probe, "replay_on_fake", lambda bdfs, p: replays.append(p) or {
        "devices": {"ok": {}}, "type1 MAP same iova again": {"errno": "EEXIST"}})
    assert probe.main(["compare", str(path)]) == 1
    assert replays == [PROFILES[profile]]
    out = capsys.readouterr().out
    assert "type1 MAP same iova again\n  real: {\"errno\": \"EBUSY\"}\n  fake: {\"errno\": \"EEXIST\"}" in out
    assert f"1 of 2 answers from {release} agree with the fake's {profile} profile; 1 disagree" in out


def test_disagreements_include_keys_missing_on_either_side():
    assert probe.disagreements({"a": {"ok": 1}, "b": {"ok": 2}}, {"a": {"ok": 1}, "c": {"ok": 3}}) == [
        ("b", {"ok": 2}, None), ("c", None, {"ok": 3})]


@pytest.mark.parametrize("content, why", [
    ("garbled", "not JSON"),
    ('{"container.GET_API_VERSION": {"ok": 0}}', "not a probe recording"),
    ('{"kernel": {"ok": "6.1"}, "devices": {"ok": {}}, "x": {"maybe": 1}}', "answer 'x' is neither"),
    ('{"kernel": {"ok": "5.10.0-30-amd64"}, "devices": {"ok": {}}}',
     "recorded on kernel '5.10.0-30-amd64', which no profile of the fake models; known: 6.1, 6.12"),
    ('{"kernel": {"errno": "EIO"}, "devices": {"ok": {}}}', "recorded on kernel None"),
    (None, "cannot read: No such file or directory"),
])
def test_compare_refuses_an_unusable_recording_in_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "recording.json"
    if content is not None:
        path.write_text(content)
    assert probe.main(["compare", str(path)]) == probe.BAD_FILE
    err = capsys.readouterr().err
    assert err.startswith(f"probe: {path}: {why}") and err.count("\n") == 1
