"""The probe recorded on Linux 6.1 in the CI VM, replayed on the fake: every answer must agree."""

import json
from pathlib import Path

import pytest

from conformance import probe

RECORDING = Path(probe.__file__).parent / "recordings" / "linux-6.1.json"


@pytest.fixture(scope="module")
def recorded():
    return json.loads(RECORDING.read_text())


@pytest.fixture(scope="module")
def replayed(recorded):
    return probe.replay_on_fake(list(recorded["devices"]["ok"]))


def test_the_recording_covers_every_area(recorded):
    """A truncated recording would agree vacuously."""
    assert recorded["kernel"]["ok"].startswith("6.1.")
    assert set(recorded["devices"]["ok"].values()) == {"edu", "ivshmem", "ivshmem-doorbell", "e1000e"}
    for prefix in ("container.", "group.", "type1 ", "v1: ", "edu SET_IRQS ", "e1000e SET_IRQS "):
        assert sum(k.startswith(prefix) for k in recorded) >= 5, prefix
    assert len(recorded) > 400


def test_fake_kernel_gives_linux_answers(recorded, replayed):
    recorded = {k: v for k, v in recorded.items() if k != "kernel"}
    found = probe.disagreements(recorded, replayed)
    assert not found, "\n".join(f"{k}: real {r} fake {f}" for k, r, f in found)


def test_compare_names_each_disagreement(tmp_path, recorded, replayed, monkeypatch, capsys):
    tampered = dict(recorded)
    tampered["type1 MAP same iova again"] = {"errno": "EBUSY"}
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(tampered))
    monkeypatch.setattr(probe, "replay_on_fake", lambda bdfs: replayed)
    assert probe.main(["compare", str(path)]) == 1
    out = capsys.readouterr().out
    assert "type1 MAP same iova again\n  real: {\"errno\": \"EBUSY\"}\n  fake: {\"errno\": \"EEXIST\"}" in out
    assert "1 disagree" in out


def test_disagreements_include_keys_missing_on_either_side():
    assert probe.disagreements({"a": {"ok": 1}, "b": {"ok": 2}}, {"a": {"ok": 1}, "c": {"ok": 3}}) == [
        ("b", {"ok": 2}, None), ("c", None, {"ok": 3})]


@pytest.mark.parametrize("content, why", [
    ("garbled", "not JSON"),
    ('{"container.GET_API_VERSION": {"ok": 0}}', "not a probe recording"),
    ('{"kernel": {"ok": "6.1"}, "devices": {"ok": {}}, "x": {"maybe": 1}}', "answer 'x' is neither"),
    (None, "cannot read: No such file or directory"),
])
def test_compare_refuses_an_unusable_recording_in_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "recording.json"
    if content is not None:
        path.write_text(content)
    assert probe.main(["compare", str(path)]) == probe.BAD_FILE
    err = capsys.readouterr().err
    assert err.startswith(f"probe: {path}: {why}") and err.count("\n") == 1
