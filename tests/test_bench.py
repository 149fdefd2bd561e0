"""The benchmarks execute (at a scale too small to mean anything); their figures are never
asserted here: timing belongs to `python3 -m bench`, not to the test suite. Figures 8 (the
conformance suite) and 9 (the VM) are left out at this scale."""

import json

from bench.__main__ import main


def test_every_figure_runs_and_lands_in_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--scale", "smoke", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    numbers = {f["number"] for f in doc["figures"]}
    assert {"1", "2", "3r", "3w", "4r", "4w", "5", "6r", "6w", "7", "7j"} <= numbers
    for figure in doc["figures"]:
        assert figure["samples"] and all(s > 0 for s in figure["samples"])
        assert set(figure["ratio"]) == {"median", "min", "max"}
    table = capsys.readouterr().out
    assert "ratio" in table and "target" in table
