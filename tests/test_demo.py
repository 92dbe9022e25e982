"""The demo behind `make demo`, shrunk (--quick): every stage runs, the students once per seed in
processes side by side, and the tables compare each distilled run with the student alone of the
same seed."""
import json
import os

import pytest

from tools import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_demo_runs_every_stage_in_parallel_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = str(tmp_path / "demo")
    rows = demo.main(["--quick", "--output", out, "--seeds", "1,0", "--jobs", "2"])
    assert [(r["run"], r["seed"]) for r in rows] == [
        ("teacher", 0), ("student alone", 0), ("student alone", 1), ("AdaDistill", 0),
        ("AdaDistill", 1), ("GKD", 0), ("GKD", 1)]
    assert [r["distill"] for r in rows] == ["none"] * 3 + ["adadistill"] * 2 + ["gkd"] * 2
    for row in rows:
        assert row["steps"] == 4 and 0.0 <= row["lfw_accuracy"] <= 100.0
        for far in ("0.0001", "0.001", "0.01"):
            assert 0.0 <= row[f"tar@{far}"] <= 100.0
        assert os.path.isfile(os.path.join(row["output"], "model.pt"))
    assert rows[1]["output"] == os.path.join(out, "student", "seed_0")
    assert os.path.isfile(os.path.join(out, "teacher", "classifier.pt"))
    assert os.path.isdir(os.path.join(out, "teacher", "embedding_cache"))
    # the students' training logs went to their runs and workers.log, not to the console
    printed = capsys.readouterr().out
    assert "Global Step" not in printed and "[demo] GKD seed 1:" in printed
    assert "total wall time" in printed

    # the tables printed are results.md; results.json holds the rows and the summary
    tables = open(os.path.join(out, "results.md")).read()
    assert tables in printed
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["runs"] == rows and saved["seeds"] == [0, 1] and saved["isa"] == "avx2"
    summary = saved["summary"]
    alone = summary["runs"]["student alone"]["metrics"]["tar@0.001"]
    ada = summary["runs"]["AdaDistill"]["metrics"]["tar@0.001"]
    diffs = [ada["values"][s] - alone["values"][s] for s in ("0", "1")]
    paired = ada["vs_student_alone"]
    assert paired["mean_diff"] == pytest.approx(sum(diffs) / 2)
    assert paired["std_diff"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2 ** 0.5)
    assert paired["wins"] == sum(d > 0 for d in diffs)
    row = summary["runs"]["AdaDistill"]["metrics"]
    assert "| AdaDistill | " + " | ".join(f"{row[k]['mean']:.2f} +- {row[k]['std']:.2f}"
                                          for k in demo.METRICS) + " |" in tables
    assert f"{paired['mean_diff']:+.2f} +- {paired['std_diff']:.2f} " \
           f"({paired['wins']}/{paired['losses']})" in tables
    assert f"| teacher (one run) | {rows[0]['lfw_accuracy']:.2f} |" in tables

    # the runs used the AVX2 kernels (--isa avx2, the default) on a machine that has them
    import torch
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert {r["cpu_capability"] for r in rows} == {"AVX2"}
        assert tables.rstrip().splitlines()[-1] == (
            f"torch {torch.__version__}, kernels AVX2 (--isa avx2), 1 intra-op thread(s) per "
            f"run, " + ("packages = requirements-lock.txt" if not saved["lock_differences"] else
                        f"{len(saved['lock_differences'])} package difference(s) from "
                        f"requirements-lock.txt"))
    assert "ATEN_CPU_CAPABILITY" not in os.environ      # the pins stayed in the workers

    # a run gives the same numbers alone as in the pool beside other runs
    job = {"run": "AdaDistill", "config": "demo_adadistill", "seed": 1, "root": out,
           "quick": True, "threads": 1}
    again, = demo.run_all([job], 1, str(tmp_path / "again.log"), demo.ISA_PINS["avx2"])
    before = next(r for r in rows if r["run"] == "AdaDistill" and r["seed"] == 1)
    for key in list(demo.METRICS) + ["loss", "cpu_capability"]:
        assert again[key] == before[key]


def test_pinned_environment_sets_and_restores(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with demo.pinned_environment({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}):
        assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
        assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "ATEN_CPU_CAPABILITY" not in os.environ
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"


def test_demo_refuses_one_seed():
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--seeds", "0"])
