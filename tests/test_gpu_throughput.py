"""bench/gpu_throughput.py keeps working: its CPU quick mode times every row and column (the
upstream-style step, our trainer's train_step on in-memory batches, our trainer through its
loader) and writes the table; its plan and upstream runner refuse what they cannot do."""
import json
import os

import pytest

from bench import gpu_throughput as bench


def test_quick_mode_times_every_row_and_column(tmp_path):
    out = tmp_path / "table"
    assert bench.main(["--quick", "--rounds", "1", "--workdir", str(tmp_path / "work"),
                       "--out", str(out)]) == 0
    result = json.loads((tmp_path / "table.json").read_text())
    rows = {(r["row"], r["precision"], r["compile"]): r for r in result["rows"]}
    assert set(rows) == {(row, p, "off") for row in bench.ROWS for p in ("fp32", "fp16")}
    for key, row in rows.items():
        for column in "abc":
            assert len(row[column]) == 1 and all(v > 0 for v in row[column]), (key, column)
        assert row["b/a"] > 0 and row["c/b"] > 0
    text = (tmp_path / "table.md").read_text()
    assert "| (a) upstream-style | (b) our step | (c) our loader | b/a | c/b |" in text
    assert text.count("\n| ") == 1 + len(rows)       # header + one line per setting


def test_plan_and_upstream_runner_refuse_by_name(tmp_path):
    args = bench.argparse.Namespace(rows="alone,gkd-cached", precisions="fp16", compile="off")
    assert [s.tag for s in bench.build_plan(args, quick=True)] == ["alone_fp16_off",
                                                                  "gkd_cached_fp16_off"]
    with pytest.raises(SystemExit, match="--rows: unknown"):
        bench.build_plan(bench.argparse.Namespace(rows="alone,kd", precisions=None,
                                                  compile=None), quick=True)
    gpu = bench.build_plan(bench.argparse.Namespace(rows=None, precisions=None, compile=None),
                           quick=False)
    assert len(gpu) == len(bench.GPU_PLAN) and bench.Setting("alone", "fp16",
                                                             "reduce-overhead") in gpu
    found = bench.run_upstream(str(tmp_path), "fp16", bench.QUICK_SCALE, lines=2, timeout=5)
    assert "no train_v2.py" in found["error"]
    os.makedirs(tmp_path / "work")
    with pytest.raises(SystemExit, match="not made by this script"):
        bench.prepare_work(str(tmp_path / "work"), bench.QUICK_SCALE, None, False, 0, 3)
