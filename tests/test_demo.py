"""The demo behind `make demo`, shrunk (--quick): every stage runs and the table has every run."""
import json
import os

from tools.demo import main


def test_quick_demo_runs_every_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = str(tmp_path / "demo")
    rows = main(["--quick", "--output", out])
    assert [r["run"] for r in rows] == ["teacher", "student alone", "AdaDistill", "GKD"]
    assert [r["distill"] for r in rows] == ["none", "none", "adadistill", "gkd"]
    for row in rows:
        assert row["steps"] == 4 and 0.0 <= row["lfw_accuracy"] <= 100.0
        for far in ("0.0001", "0.001", "0.01"):
            assert 0.0 <= row[f"tar_at_far_{far}"] <= 100.0
    printed = capsys.readouterr().out
    assert "synthetic LFW acc (%)" in printed and "total wall time" in printed
    assert "IJB-C TAR@FAR=1e-03 (%)" in printed
    assert os.path.isdir(os.path.join(out, "data", "IJBC", "meta"))
    assert json.load(open(os.path.join(out, "results.json"))) == rows
    for run in ("teacher", "student", "adadistill", "gkd"):
        assert os.path.isfile(os.path.join(out, run, "model.pt"))
    assert os.path.isfile(os.path.join(out, "teacher", "classifier.pt"))
