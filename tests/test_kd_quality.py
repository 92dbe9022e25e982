"""The harness of bench/kd_quality.py (not its numbers): config digests and the teacher / run
caches keyed by them, the aggregation into a table, the paired statistic, the reports."""
import argparse
import concurrent.futures
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from bench import kd_quality
from tools import kd_bench
from tools.kd_bench import (aggregate, cached_result, config_digest, gap_closed, mean_std,
                           paired_comparison)


# --------------------------------------------------------------------------- digests

def test_config_digest_ignores_key_order_and_container_spelling():
    a = {"lr": 0.1, "margin_list": (1.0, 0.0, 0.35), "nested": {"x": 1, "y": [2, 3]}}
    b = {"nested": {"y": (2, 3), "x": 1.0}, "margin_list": [1, 0, 0.35], "lr": 0.1}
    assert config_digest(a) == config_digest(b)
    assert len(config_digest(a)) == 64 and int(config_digest(a), 16) >= 0


@pytest.mark.parametrize("change", [{"lr": 0.2}, {"margin_list": (1.0, 0.0, 0.4)},
                                    {"nested": {"x": 2, "y": [2, 3]}}, {"extra": None}])
def test_config_digest_changes_with_any_value(change):
    base = {"lr": 0.1, "margin_list": (1.0, 0.0, 0.35), "nested": {"x": 1, "y": [2, 3]}}
    assert config_digest(dict(base, **change)) != config_digest(base)


def test_code_digest_follows_every_source_file_and_nothing_else(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "one.py").write_text("z = 3\n")
    paths = ("pkg", "one.py")
    first = kd_bench.code_digest(str(tmp_path), paths)
    (tmp_path / "pkg" / "notes.txt").write_text("not code")            # not a .py file
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.py").write_text("cache")     # never hashed
    assert kd_bench.code_digest(str(tmp_path), paths) == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")           # an edit
    edited = kd_bench.code_digest(str(tmp_path), paths)
    assert edited != first
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "c.py")  # a move, same bytes
    assert kd_bench.code_digest(str(tmp_path), paths) not in (first, edited)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        kd_bench.code_digest(str(tmp_path), ("pkg", "missing.py"))


def test_the_benchmark_digests_the_repository_code():
    assert kd_quality.CODE == kd_bench.code_digest(kd_quality.REPO)
    assert len(kd_quality.CODE) == 64


def test_cached_result_needs_matching_digest(tmp_path):
    folder = str(tmp_path)
    assert cached_result(folder, "result.json", "abc") is None               # no file
    (tmp_path / "result.json").write_text(json.dumps({"digest": "abc", "x": 1}))
    assert cached_result(folder, "result.json", "abc") == {"digest": "abc", "x": 1}
    assert cached_result(folder, "result.json", "abd") is None               # other config
    (tmp_path / "result.json").write_text('{"digest": "abc", "x"')           # torn file
    assert cached_result(folder, "result.json", "abc") is None


def _args(root, **kw):
    ns = argparse.Namespace(quick=True, jobs=1, seeds="0,1", methods="AdaCosDistill alpha'",
                            root=str(root), out="", fresh=False, fresh_teacher=False,
                            report_only=False, argv=[])
    for key, value in kw.items():
        setattr(ns, key, value)
    return ns


class _Fakes:
    """Stand-ins for the job functions: record calls, write the markers the real ones write."""

    def __init__(self):
        self.teacher_calls, self.student_calls, self.data_calls = [], [], []

    def make_data(self, task, root):
        self.data_calls.append(root)
        os.makedirs(root, exist_ok=True)
        return root

    def train_teacher(self, job):
        self.teacher_calls.append(job["digest"])
        os.makedirs(job["output"], exist_ok=True)
        result = {"name": "teacher", "digest": job["digest"], "seconds": 1.0,
                  "metrics": {k: 90.0 for k in kd_bench.METRICS}}
        (open(os.path.join(job["output"], "teacher.json"), "w")).write(json.dumps(result))
        return result

    def train_and_eval(self, job):
        assert not job["needs_teacher"] or os.path.isfile(
            os.path.join(os.path.dirname(job["config"]["teacher_checkpoint"]), "teacher.json"))
        self.student_calls.append((job["method"], job["seed"]))
        os.makedirs(job["output"], exist_ok=True)
        value = 50.0 + job["seed"] + (5.0 if job["method"] != kd_bench.BASELINE else 0.0)
        result = {"name": job["name"], "method": job["method"], "seed": job["seed"],
                  "digest": job["digest"], "seconds": 1.0,
                  "metrics": {k: value for k in kd_bench.METRICS}}
        open(os.path.join(job["output"], "result.json"), "w").write(json.dumps(result))
        return result


@pytest.fixture
def fakes(monkeypatch):
    f = _Fakes()
    monkeypatch.setattr(kd_quality, "make_data", f.make_data)
    monkeypatch.setattr(kd_quality, "train_teacher", f.train_teacher)
    monkeypatch.setattr(kd_quality, "train_and_eval", f.train_and_eval)
    monkeypatch.setattr(kd_quality, "_executor",
                        lambda jobs: concurrent.futures.ThreadPoolExecutor(1))
    monkeypatch.setattr(kd_quality, "machine", lambda: {"cpus": 2})
    return f


def test_teacher_is_trained_once_and_reused_by_digest(tmp_path, fakes, monkeypatch):
    payload = kd_quality.run(_args(tmp_path))
    assert len(fakes.teacher_calls) == 1
    assert sorted(fakes.student_calls) == sorted([(kd_bench.BASELINE, 0), (kd_bench.BASELINE, 1),
                                                  ("AdaCosDistill alpha'", 0),
                                                  ("AdaCosDistill alpha'", 1)])
    rows = payload["summary"]["rows"]
    assert [r["method"] for r in rows] == [kd_bench.BASELINE, "AdaCosDistill alpha'"]
    for name in ("results.json", "results.md", "kd_quality.png"):
        assert os.path.isfile(tmp_path / "quick" / name)

    # same command: nothing is trained again, the same table comes back
    again = kd_quality.run(_args(tmp_path))
    assert len(fakes.teacher_calls) == 1 and len(fakes.student_calls) == 4
    assert again["summary"] == payload["summary"]

    # another teacher config: a new teacher; the distilled runs depend on it, the student
    # alone does not
    task = kd_bench.merged_task(True)
    monkeypatch.setattr(kd_quality, "merged_task",
                        lambda quick: dict(task, teacher=dict(task["teacher"], num_epoch=3)))
    kd_quality.run(_args(tmp_path))
    assert len(fakes.teacher_calls) == 2 and fakes.teacher_calls[0] != fakes.teacher_calls[1]
    assert sorted(fakes.student_calls[4:]) == [("AdaCosDistill alpha'", 0),
                                               ("AdaCosDistill alpha'", 1)]


def test_fresh_flags_retrain(tmp_path, fakes):
    kd_quality.run(_args(tmp_path, seeds="0", methods=""))
    n_students = len(fakes.student_calls)
    kd_quality.run(_args(tmp_path, seeds="0", methods="", fresh=True))
    assert len(fakes.teacher_calls) == 1 and len(fakes.student_calls) == 2 * n_students
    kd_quality.run(_args(tmp_path, seeds="0", methods="", fresh_teacher=True))
    assert len(fakes.teacher_calls) == 2


def test_report_only_trains_nothing_and_tables_the_finished_runs(tmp_path, fakes, capsys):
    with pytest.raises(SystemExit, match="no finished teacher"):
        kd_quality.run(_args(tmp_path, report_only=True))
    kd_quality.run(_args(tmp_path, seeds="0"))
    calls = (len(fakes.teacher_calls), len(fakes.student_calls))
    payload = kd_quality.run(_args(tmp_path, seeds="0,1", report_only=True))
    assert (len(fakes.teacher_calls), len(fakes.student_calls)) == calls
    assert [r["n"] for r in payload["summary"]["rows"]] == [1, 1]
    assert "2 runs not finished" in capsys.readouterr().out


def test_unknown_method_is_refused(tmp_path, fakes):
    with pytest.raises(SystemExit, match="unknown"):
        kd_quality.run(_args(tmp_path, methods="AdaFooDistill"))


def test_teacher_digest_depends_on_teacher_and_data_only():
    task = kd_bench.merged_task(False)
    t1 = kd_quality.teacher_job(task, "/d", "data1", "/r")
    other_student = dict(task, student=dict(task["student"], num_epoch=99))
    assert kd_quality.teacher_job(other_student, "/d", "data1", "/r")["digest"] == t1["digest"]
    assert kd_quality.teacher_job(task, "/d", "data2", "/r")["digest"] != t1["digest"]
    other_teacher = dict(task, teacher=dict(task["teacher"], seed=1))
    assert kd_quality.teacher_job(other_teacher, "/d", "data1", "/r")["digest"] != t1["digest"]


def test_student_jobs_pair_seeds_and_point_at_the_teacher():
    task = kd_bench.merged_task(False)
    methods = kd_bench.method_table(task["data"]["num_ids"])
    teacher = kd_quality.teacher_job(task, "/d", "data", "/r")
    jobs = kd_quality.student_jobs(task, methods, "/d", "data", teacher, "/r")
    assert len(jobs) == len(methods) * len(task["seeds"])
    assert len({j["digest"] for j in jobs}) == len(jobs)
    assert len({j["output"] for j in jobs}) == len(jobs)
    for job in jobs:
        cfg = job["config"]
        assert cfg["seed"] == job["seed"] and cfg["network"] == task["student"]["network"]
        assert "grad_reduction" not in cfg
        if cfg["distill"] == "none":
            assert "teacher_cache" not in cfg
        else:
            assert cfg["teacher_cache"].startswith(teacher["output"])
        if cfg["distill"] == "adadistill":       # centers start from noise, as in the paper
            assert "teacher_classifier" not in cfg
        if cfg["distill"] in ("arcdistill", "cosdistill", "gkd"):
            assert cfg["teacher_classifier"].startswith(teacher["output"])


def test_every_method_config_is_a_valid_trainer_config():
    from tools.kd_bench_jobs import run_config
    task = kd_bench.merged_task(False)
    methods = kd_bench.method_table(task["data"]["num_ids"])
    names = [m.name for m in methods]
    assert len(set(names)) == len(names) and names[0] == kd_bench.BASELINE
    teacher = kd_quality.teacher_job(task, "/d", "data", "/r")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for job in kd_quality.student_jobs(task, methods, "/d", "data", teacher, "/r")[:len(methods)]:
        cfg = run_config(dict(job, repo=repo))
        assert cfg.distill == job["config"]["distill"]
    assert kd_bench._gkd_k(85742) == 10000 and kd_bench._gkd_k(1000) == 117


def test_slug():
    assert kd_quality.slug("AdaArcDistill alpha'") == "adaarcdistill_alpha_p"
    assert kd_quality.slug("GKD fixed-k") == "gkd_fixed_k"


# --------------------------------------------------------------------------- statistics

def test_mean_std_is_the_sample_std():
    values = [1.0, 2.0, 4.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_comparison_matches_scipy_ttest_rel():
    base = {0: 60.0, 1: 62.5, 2: 61.0, 3: 59.0}
    method = {0: 61.0, 1: 65.0, 2: 60.5, 3: 62.0}
    out = paired_comparison(base, method)
    ref = stats.ttest_rel([method[s] for s in range(4)], [base[s] for s in range(4)])
    diffs = np.array([1.0, 2.5, -0.5, 3.0])
    assert out["n"] == 4 and out["seeds"] == [0, 1, 2, 3]
    assert out["mean_diff"] == pytest.approx(diffs.mean())
    assert out["std_diff"] == pytest.approx(diffs.std(ddof=1))
    assert out["t"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    assert (out["wins"], out["losses"], out["ties"]) == (3, 1, 0)


def test_paired_comparison_uses_only_common_seeds_and_edge_cases():
    out = paired_comparison({0: 1.0, 1: 2.0, 5: 9.0}, {1: 2.0, 0: 3.0, 7: 0.0})
    assert out["seeds"] == [0, 1] and out["mean_diff"] == pytest.approx(1.0)
    assert (out["wins"], out["losses"], out["ties"]) == (1, 0, 1)
    one = paired_comparison({0: 1.0}, {0: 1.5})
    assert one["n"] == 1 and one["t"] is None and one["p"] is None
    same = paired_comparison({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0})     # differences all +1
    assert same["t"] == math.inf and same["p"] is None
    zero = paired_comparison({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert zero["t"] == 0.0 and zero["ties"] == 2
    with pytest.raises(ValueError, match="no common seeds"):
        paired_comparison({0: 1.0}, {1: 1.0})


def test_gap_closed():
    assert gap_closed(60.0, 50.0, 70.0) == pytest.approx(0.5)
    assert gap_closed(45.0, 50.0, 70.0) == pytest.approx(-0.25)
    assert gap_closed(75.0, 50.0, 70.0) == pytest.approx(1.25)
    assert gap_closed(60.0, 50.0, 50.0) is None and gap_closed(60.0, 50.0, 40.0) is None


def _runs():
    metrics = ("a", "b")
    vals = {"student alone": {0: (50.0, 90.0), 1: (52.0, 91.0), 2: (51.0, 89.0)},
            "M1": {0: (55.0, 92.0), 1: (53.0, 90.0), 2: (57.0, 93.0)},
            "M2": {2: (49.0, 88.0), 0: (50.0, 90.0)}}
    runs = [{"method": m, "seed": s, "metrics": dict(zip(metrics, v))}
            for m, seeds in vals.items() for s, v in seeds.items()]
    return runs, vals


def test_aggregate_rows_means_gaps_and_pairs():
    runs, vals = _runs()
    summary = aggregate(runs, {"a": 61.0, "b": 95.0}, ["student alone", "M1", "M2", "absent"],
                        metrics=("a", "b"))
    assert [r["method"] for r in summary["rows"]] == ["student alone", "M1", "M2"]
    m1 = summary["rows"][1]
    assert m1["n"] == 3 and m1["seeds"] == [0, 1, 2]
    a = np.array([v[0] for v in vals["M1"].values()])
    assert m1["metrics"]["a"]["mean"] == pytest.approx(a.mean())
    assert m1["metrics"]["a"]["std"] == pytest.approx(a.std(ddof=1))
    assert m1["metrics"]["a"]["values"] == {0: 55.0, 1: 53.0, 2: 57.0}
    assert m1["metrics"]["a"]["gap_closed"] == pytest.approx((55.0 - 51.0) / (61.0 - 51.0))
    ref = stats.ttest_rel([55.0, 53.0, 57.0], [50.0, 52.0, 51.0])
    assert m1["metrics"]["a"]["paired"]["t"] == pytest.approx(ref.statistic)
    m2 = summary["rows"][2]                     # only seeds 0 and 2: paired on those
    assert m2["metrics"]["b"]["paired"]["seeds"] == [0, 2]
    assert m2["metrics"]["b"]["paired"]["mean_diff"] == pytest.approx(((88 - 89) + (90 - 90)) / 2)
    assert summary["rows"][0]["metrics"]["a"]["paired"] is None
    assert summary["rows"][0]["metrics"]["a"]["gap_closed"] == pytest.approx(0.0)


def test_aggregate_refuses_duplicates_and_a_missing_baseline():
    runs, _ = _runs()
    with pytest.raises(ValueError, match="two results"):
        aggregate(runs + [runs[0]], {"a": 1.0, "b": 1.0}, ["student alone"], metrics=("a", "b"))
    with pytest.raises(ValueError, match="baseline"):
        aggregate([r for r in runs if r["method"] != "student alone"], {"a": 1.0, "b": 1.0},
                  ["M1"], metrics=("a", "b"))


def test_markdown_and_plot(tmp_path):
    runs, _ = _runs()
    titles = {"a": "A", "b": "B"}
    summary = aggregate(runs, {"a": 61.0, "b": 95.0}, ["student alone", "M1", "M2"],
                        metrics=("a", "b"))
    text = kd_bench.markdown_tables(summary, titles=titles)
    lines = text.splitlines()
    assert lines[0] == "| method | n | A | B |" and lines[1] == "|---|---|---|---|"
    assert "| teacher | 1 | 61.00 | 95.00 |" in lines
    assert any(line.startswith("| M1 | 3 | 55.00 +- 2.00 |") for line in lines)
    assert "| (gap, points) | 10.00 | 5.00 |" in lines
    assert "| M1 | 0.40 | 0.33 |" in lines          # (55 - 51) / 10, (91.67 - 90) / 5
    m1 = [line for line in lines if line.startswith("| M1 | +4.00 +- 2.65 (t 2.62, p 0.120, "
                                                        "3/0/0)")]
    assert len(m1) == 1
    path = kd_bench.plot_summary(summary, str(tmp_path / "p.png"), titles=titles)
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_per_seed_table_says_whether_every_seed_beats_every_baseline_seed():
    runs, _ = _runs()
    summary = aggregate(runs, {"a": 61.0, "b": 95.0}, ["student alone", "M1", "M2"],
                        metrics=("a", "b"))
    lines = kd_bench.per_seed_table(summary, "a", titles={"a": "A", "b": "B"})
    assert lines[2] == "| method | seed 0 | seed 1 | seed 2 | all above |"
    assert "| student alone | 50.00 | 52.00 | 51.00 | -- |" in lines
    assert "| M1 | 55.00 | 53.00 | 57.00 | yes |" in lines    # worst 53 > best baseline 52
    assert "| M2 | 50.00 | -- | 49.00 | no |" in lines       # seed 1 missing -> "--"
    assert kd_bench.markdown_tables(summary, titles={"a": "A", "b": "B"}).splitlines()[
        -len(lines):] == lines                                   # the report ends with it


# --------------------------------------------------------------------------- evaluation

def test_ijb_eval_from_cached_aligned_images_equals_the_ijb_pipeline(tmp_path):
    """The benchmark's IJB evaluation (aligned images kept in a .npy) gives the numbers of
    eval.ijb's own pipeline (extract_features -> score_features -> evaluate_scores)."""
    import torch

    from eval.ijb import (AlignedFaceDataset, evaluate_scores, extract_features, far_key,
                          load_meta, score_features)
    from tools.kd_bench_jobs import ALIGNED_FILE, ijb_tar_at_far, register_backbones
    from eval.model_io import TorchEmbedder
    from tools.synthetic import write_ijb
    from plugins.backbones import get_model

    root = str(tmp_path / "IJBC")
    write_ijb(root, "IJBC", num_ids=4, templates_per_id=2, medias_per_template=2,
              images_per_media=1, impostor_ratio=10, seed=3)
    register_backbones()
    torch.manual_seed(0)
    model = get_model("kdb_student", num_features=16).eval()
    fars = (1e-2, 1e-1)
    ours = ijb_tar_at_far(model, root, "IJBC", fars, batch_size=5)
    assert os.path.isfile(os.path.join(root, ALIGNED_FILE.format(size=112)))
    again = ijb_tar_at_far(model, root, "IJBC", fars, batch_size=5)     # from the .npy
    meta = load_meta(root, "IJBC")
    data = AlignedFaceDataset(meta.image_dir, meta.names, meta.landmarks, meta.landmark_file)
    feats = extract_features(TorchEmbedder(model, autocast=False), data, batch_size=5,
                             num_workers=0, progress=False)
    ref = evaluate_scores(meta.labels, score_features(meta, feats)[0], "closest", fars)
    for far in fars:
        assert ours[f"tar@{far_key(far)}"] == ref["tar_at_far"][far_key(far)]
    assert ours == again and ours["ijb_auc"] == ref["auc"]
    assert ours["ijb_genuine"] == ref["num_genuine"] == 4      # 4 ids x C(2, 2) template pairs
