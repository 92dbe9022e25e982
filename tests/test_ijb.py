"""IJB-B/C evaluation: meta parsing and its errors, the CLI end to end with a tiny model, and
TAR@FAR against an independent per-template / per-pair float64 implementation of the published
pipeline (closest-FPR and strict rules)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from eval import eval_ijbc
from eval import ijb
from data.image_codec import decode_rgb
from tools.synthetic import write_ijb
from plugins.backbones import get_model

FAR_KEYS = ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ijb") / "IJBC")
    info = write_ijb(root, target="IJBC", num_ids=8, templates_per_id=3, seed=0)
    return root, info


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    torch.save(get_model("tiny_s", num_features=512).state_dict(), path)
    return path


def _meta_copy(src_root, dst_root):
    """A writable copy of meta/ next to a symlink of loose_crop/."""
    shutil.copytree(os.path.join(src_root, "meta"), os.path.join(dst_root, "meta"))
    os.symlink(os.path.join(src_root, "loose_crop"), os.path.join(dst_root, "loose_crop"))
    return dst_root


def _edit(path, fn):
    with open(path) as handle:
        lines = handle.read().splitlines()
    with open(path, "w") as handle:
        handle.write("\n".join(fn(lines)) + "\n")


# --------------------------------------------------------------------------- reference pipeline

def reference_templates(img_feats, scores, templates, medias):
    """Float64 per-template loop of the published aggregation: ``{template id: [D] unit vector}``."""
    dim = img_feats.shape[1] // 2
    f = (img_feats[:, :dim].astype(np.float64) + img_feats[:, dim:]) * scores[:, None]
    vectors = {}
    for t in np.unique(templates):
        idx = np.flatnonzero(templates == t)
        total = np.zeros(dim)
        for m in np.unique(medias[idx]):
            total += f[idx[medias[idx] == m]].mean(axis=0)
        vectors[t] = total / np.linalg.norm(total)
    return vectors


def reference_scores(img_feats, scores, templates, medias, pairs):
    """Straightforward float64 version of the published pipeline (loops over templates/pairs)."""
    vectors = reference_templates(img_feats, scores, templates, medias)
    return np.array([float(vectors[a] @ vectors[b]) for a, b in pairs])


def reference_tar(labels, scores, rule):
    fpr, tpr, _ = roc_curve(labels, scores)
    out = {}
    for far in ijb.FARS:
        best = None
        for i in range(len(fpr)):
            if rule == "closest":
                key = (abs(fpr[i] - far), -tpr[i])
                if best is None or key < best[0]:
                    best = (key, tpr[i])
            elif fpr[i] <= far and (best is None or tpr[i] > best[1]):
                best = (None, tpr[i])
        out[str(far)] = 100.0 * best[1]
    return out


# --------------------------------------------------------------------------- end to end

def test_cli_with_model_writes_everything(ijb_root, tiny_checkpoint, tmp_path, capsys):
    root, info = ijb_root
    payload = eval_ijbc.main(["--model-prefix", tiny_checkpoint, "--network", "tiny_s",
                              "--image-path", root, "--result-dir", str(tmp_path), "--job", "tiny",
                              "--batch-size", "16", "--num-workers", "1", "--no-progress"])
    out = tmp_path / "tiny"
    feats = np.load(out / "ijbc_features.npy")
    scores = np.load(out / "ijbc.npy")
    assert feats.shape == (info["num_images"], 1024) and feats.dtype == np.float32
    assert scores.shape == (info["num_pairs"],)
    saved = json.loads((out / "ijbc.json").read_text())
    assert list(saved["tar_at_far"]) == FAR_KEYS
    assert saved["tar_at_far"] == payload["tar_at_far"]
    assert saved["num_genuine"] == info["num_genuine"] and saved["rule"] == "closest"
    assert (out / "ijbc_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "ijbc_roc.pdf").read_bytes()[:4] == b"%PDF"
    assert "Methods" in capsys.readouterr().out
    assert not [p for p in os.listdir(out) if ".tmp." in p]

    # the stored features are [embed(aligned) | embed(mirror)] in 5pts-file order
    meta = ijb.load_meta(root, "IJBC")
    model = get_model("tiny_s", num_features=512)
    model.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    model.eval()
    for i in (0, len(meta.names) - 1):
        with open(os.path.join(root, "loose_crop", meta.names[i]), "rb") as handle:
            aligned = ijb.norm_crop(decode_rgb(handle.read()), meta.landmarks[i])
        x = torch.from_numpy(aligned.transpose(2, 0, 1).copy()).float()[None]
        x = (x / 255 - 0.5) / 0.5
        with torch.no_grad():
            expected = torch.cat([model(x), model(x.flip(3))], dim=1).numpy()[0]
        np.testing.assert_allclose(feats[i], expected, rtol=1e-4, atol=1e-5)

    # re-scoring the stored features gives the same scores and TAR@FAR without the model
    again = eval_ijbc.main(["--features", str(out / "ijbc_features.npy"), "--image-path", root,
                            "--result-dir", str(tmp_path), "--job", "rescore"])
    np.testing.assert_array_equal(np.load(tmp_path / "rescore" / "ijbc.npy"), scores)
    assert again["tar_at_far"] == payload["tar_at_far"]
    assert not (tmp_path / "rescore" / "ijbc_features.npy").exists()


@pytest.mark.parametrize("rule", ["closest", "strict"])
def test_tar_at_far_matches_reference_pipeline(ijb_root, tmp_path, rule):
    root, info = ijb_root
    meta = ijb.load_meta(root, "IJBC")
    rng = np.random.default_rng(1)
    identity = np.asarray(info["templates"])[meta.templates - 1]
    centers = rng.standard_normal((identity.max() + 1, 16))
    feats = np.concatenate([centers[identity] + 3.0 * rng.standard_normal((len(identity), 16)),
                            centers[identity] + 3.0 * rng.standard_normal((len(identity), 16))],
                           axis=1).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    payload = eval_ijbc.main(["--features", str(tmp_path / "feats.npy"), "--image-path", root,
                              "--result-dir", str(tmp_path), "--job", rule, "--far-rule", rule])
    ours = np.load(tmp_path / rule / "ijbc.npy")
    expected = reference_scores(feats, meta.det_scores, meta.templates, meta.medias, meta.pairs)
    np.testing.assert_allclose(ours, expected, atol=2e-6)
    want = reference_tar(meta.labels, expected, rule)
    assert payload["tar_at_far"] == pytest.approx(want, abs=1e-9)
    tars = list(payload["tar_at_far"].values())
    assert 0 < tars[0] < tars[-1] < 100   # a non-trivial curve


def test_operating_point_rules_on_a_hand_made_curve():
    fpr = np.array([0.0, 0.0, 0.00005, 0.000101, 0.25, 0.75, 1.0])
    tpr = np.array([0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    thr = np.arange(7.0)[::-1]
    pick = {rule: [p.tar for p in ijb.operating_points(fpr, tpr, thr, (1e-6, 1e-4, 0.5), rule)]
            for rule in ijb.RULES}
    # 1e-6: two points at fpr 0 tie -> the higher TPR; 1e-4: the closest point is above the
    # target (0.000101), strict stays below; 0.5: 0.25 and 0.75 equally close -> higher TPR
    assert pick["closest"] == [0.5, 0.7, 0.9]
    assert pick["strict"] == [0.5, 0.6, 0.8]
    with pytest.raises(ValueError, match="rule must be one of"):
        ijb.operating_points(fpr, tpr, thr, (0.1,), "nearest")


def test_template_features_and_pair_scores_by_hand():
    f = np.arange(1, 13, dtype=np.float32).reshape(6, 2)            # D = 1: [plain | mirror]
    det = np.array([1.0, 0.5, 2.0, 1.0, 1.0, 3.0], dtype=np.float32)
    templates = np.array([7, 7, 7, 3, 3, 9])
    medias = np.array([1, 1, 2, 5, 6, 1])
    feats, tids = ijb.template_features(np.concatenate([f, -0.5 * f], axis=1), det, templates,
                                        medias)
    per_image = (f + -0.5 * f) * det[:, None]                        # [6, 2]
    v7 = (per_image[0] + per_image[1]) / 2 + per_image[2]
    v3 = per_image[3] + per_image[4]
    v9 = per_image[5]
    expected = np.stack([v / np.linalg.norm(v) for v in (v3, v7, v9)])
    assert tids.tolist() == [3, 7, 9]
    np.testing.assert_allclose(feats, expected, rtol=1e-6)

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((20, 8)).astype(np.float32)
    ids = np.arange(100, 120)
    pairs = ids[rng.integers(0, 20, (300, 2))]
    pairs[:5] = [[100, 100], [119, 100], [100, 119], [105, 104], [118, 119]]
    want = np.einsum("ij,ij->i", vecs[pairs[:, 0] - 100].astype(np.float64),
                     vecs[pairs[:, 1] - 100])
    for block_rows in (3, 7, 64):    # several blocks, subset and full column paths
        np.testing.assert_allclose(ijb.score_pairs(vecs, ids, pairs, block_rows), want,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="template id 150 has no features"):
        ijb.score_pairs(vecs, ids, np.array([[100, 150]]))
    big = np.array([-5, 7, 10 ** 12])                  # binary-search path (ids not small)
    assert ijb.template_rows(big, np.array([[10 ** 12, -5], [7, 7]])).tolist() == [[2, 0], [1, 1]]
    with pytest.raises(ValueError, match="template id 8 has no features"):
        ijb.template_rows(big, np.array([7, 8]))


def test_compare_several_score_files(ijb_root, tmp_path):
    root, info = ijb_root
    labels = ijb.load_meta(root, "IJBC").labels
    rng = np.random.default_rng(0)
    good = labels + 0.8 * rng.standard_normal(len(labels))
    np.save(tmp_path / "a.npy", good)
    np.save(tmp_path / "b.npy", rng.standard_normal(len(labels)))
    payload = eval_ijbc.main(["--image-path", root, "--result-dir", str(tmp_path), "--job", "cmp",
                              "--compare", f"teacher={tmp_path / 'a.npy'}",
                              "--scores", str(tmp_path / "b.npy")])
    assert list(payload["methods"]) == ["teacher", "b"]
    assert payload["methods"]["teacher"]["tar_at_far"] == pytest.approx(
        reference_tar(labels, good, "closest"), abs=1e-9)
    assert (tmp_path / "cmp" / "ijbc_compare.json").exists()
    assert (tmp_path / "cmp" / "ijbc_compare_roc.pdf").exists()
    np.save(tmp_path / "short.npy", good[:-1])
    with pytest.raises(ValueError, match="short.npy: .* scores but the pair file has"):
        eval_ijbc.main(["--image-path", root, "--result-dir", str(tmp_path),
                        "--compare", str(tmp_path / "short.npy")])


# --------------------------------------------------------------------------- errors

def test_missing_image_names_file_and_line(ijb_root):
    root, _ = ijb_root
    meta = ijb.load_meta(root, "IJBC")
    names = list(meta.names)
    names[4] = "does_not_exist.jpg"
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score\.txt:5: image .*does_not_exist"
                                         r"\.jpg does not exist \(1 of"):
        ijb.AlignedFaceDataset(meta.image_dir, names, meta.landmarks, meta.landmark_file)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:2] + [" ".join(lines[2].split()[:-1])] + lines[3:],
     r"ijbc_name_5pts_score\.txt:3: 11 fields, expected 12"),
    (lambda lines: lines[:6] + [" ".join(lines[6].split()[:3] + ["abc"] + lines[6].split()[4:])]
     + lines[7:],
     r"ijbc_name_5pts_score\.txt:7: field 'abc' is not a finite number"),
    (lambda lines: lines[:1] + [lines[1].rsplit(" ", 1)[0] + " nan"] + lines[2:],
     r"ijbc_name_5pts_score\.txt:2: field 'nan' is not a finite number"),
    (lambda lines: lines[:3] + [lines[4], lines[3]] + lines[5:],
     r"ijbc_name_5pts_score\.txt:4: image '5\.jpg' but .*ijbc_face_tid_mid\.txt:4 has '4\.jpg'"),
    (lambda lines: lines[:-1],
     r"ijbc_name_5pts_score\.txt:\d+: image '<end of file>'.*must list the same images"),
])
def test_bad_landmark_file(ijb_root, tmp_path, edit, message):
    root = _meta_copy(ijb_root[0], str(tmp_path / "IJBC"))
    _edit(os.path.join(root, "meta", "ijbc_name_5pts_score.txt"), edit)
    with pytest.raises(ValueError, match=message):
        ijb.load_meta(root, "IJBC")


@pytest.mark.parametrize("name, edit, message", [
    ("ijbc_face_tid_mid.txt", lambda lines: lines[:2] + ["3.jpg 1"] + lines[3:],
     r"ijbc_face_tid_mid\.txt:3: 2 fields, expected 3"),
    ("ijbc_face_tid_mid.txt", lambda lines: lines[:2] + ["3.jpg x 2"] + lines[3:],
     r"ijbc_face_tid_mid\.txt:3: field 'x' is not an integer"),
    ("ijbc_template_pair_label.txt", lambda lines: lines[:5] + ["1 2"] + lines[6:],
     r"ijbc_template_pair_label\.txt:6: 2 fields, expected 3"),
    ("ijbc_template_pair_label.txt", lambda lines: lines[:5] + ["1 2 yes"] + lines[6:],
     r"ijbc_template_pair_label\.txt:6: field 'yes' is not an integer"),
    ("ijbc_template_pair_label.txt", lambda lines: lines[:5] + ["1 2 2"] + lines[6:],
     r"ijbc_template_pair_label\.txt:6: label 2 is not 0 or 1"),
    ("ijbc_template_pair_label.txt", lambda lines: lines[:7] + ["1 999 0"] + lines[8:],
     r"ijbc_template_pair_label\.txt:8: template pair \[1, 999\] names a template with no image"),
])
def test_bad_meta_files(ijb_root, tmp_path, name, edit, message):
    root = _meta_copy(ijb_root[0], str(tmp_path / "IJBC"))
    _edit(os.path.join(root, "meta", name), edit)
    with pytest.raises(ValueError, match=message):
        ijb.load_meta(root, "IJBC")


def test_missing_meta_and_wrong_feature_shape(ijb_root, tmp_path):
    with pytest.raises(ValueError, match=r"ijbb_face_tid_mid\.txt does not exist"):
        ijb.load_meta(ijb_root[0], "IJBB")
    np.save(tmp_path / "f.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"f\.npy: shape \[3, 8\], expected \[\d+, 2D\]"):
        eval_ijbc.main(["--features", str(tmp_path / "f.npy"), "--image-path", ijb_root[0],
                        "--result-dir", str(tmp_path)])


def test_cli_refuses_conflicting_inputs(ijb_root, tmp_path):
    root = ijb_root[0]
    with pytest.raises(SystemExit, match="exactly one of --model-prefix"):
        eval_ijbc.main(["--image-path", root, "--result-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="do not combine them with --model-prefix or --features"):
        eval_ijbc.main(["--image-path", root, "--features", "f.npy", "--compare", "a.npy"])
    with pytest.raises(ValueError, match=r"missing\.pt does not exist"):
        eval_ijbc.main(["--image-path", root, "--model-prefix", str(tmp_path / "missing.pt"),
                        "--network", "tiny_s"])


# --------------------------------------------------------------------------- fast path vs reference

def _lattice_ijb(seed, num_templates=60, dim=16, num_pairs=4000):
    """Images whose template features are exact lattice unit vectors, so every pair score is an
    exact multiple of 1/64 in float32 AND float64: massive score ties, identical in both paths.

    Half the templates have 4 entries +-0.5, half 16 entries +-0.25 (unit norm exactly).  Each
    template has 1-3 medias of 1-4 identical images, plain = mirror = v / 2, detector score 1."""
    rng = np.random.default_rng(seed)
    vectors = np.zeros((num_templates, dim), dtype=np.float32)
    for t in range(num_templates):
        k, value = (4, 0.5) if t % 2 else (16, 0.25)
        where = rng.choice(dim, k, replace=False)
        vectors[t, where] = value * rng.choice([-1.0, 1.0], k)
    rows, templates, medias = [], [], []
    for t in range(num_templates):
        for m in range(int(rng.integers(1, 4))):
            for _ in range(int(rng.integers(1, 5))):
                rows.append(vectors[t] / 2)
                templates.append(1000 + 7 * t)
                medias.append(100 * t + m)
    half = np.array(rows, dtype=np.float32)
    order = rng.permutation(len(rows))                     # images not grouped by template
    feats = np.concatenate([half, half], axis=1)[order]
    templates, medias = np.array(templates)[order], np.array(medias)[order]
    det = np.ones(len(rows), dtype=np.float32)
    pairs = 1000 + 7 * rng.integers(0, num_templates, (num_pairs, 2))
    exact = np.einsum("ij,ij->i", vectors[(pairs[:, 0] - 1000) // 7].astype(np.float64),
                      vectors[(pairs[:, 1] - 1000) // 7])
    # genuine pairs mostly at high scores, some impostors tie with them
    labels = (exact + 0.35 * rng.standard_normal(num_pairs) > 0.6).astype(np.int8)
    return feats, det, templates, medias, pairs, labels


@pytest.mark.parametrize("rule", ["closest", "strict"])
@pytest.mark.parametrize("method, block", [("sampled", 1), ("sampled", 7), ("sampled", 4096),
                                           ("dense", 7), ("dense", 2048), ("auto", 256)])
def test_fast_path_tar_equals_float64_reference_with_ties(rule, method, block):
    feats, det, templates, medias, pairs, labels = _lattice_ijb(seed=3)
    tfeats, tids = ijb.template_features(feats, det, templates, medias)
    reference = reference_templates(feats, det, templates, medias)
    np.testing.assert_allclose(tfeats, np.stack([reference[t] for t in tids]), rtol=0, atol=1e-6)
    ours = ijb.score_pairs(tfeats, tids, pairs, block_rows=block, method=method, block_cols=block)
    expected = reference_scores(feats, det, templates, medias, pairs)
    assert np.unique(expected).size < 40 < len(pairs)                 # heavily tied scores
    np.testing.assert_array_equal(ours.astype(np.float64), expected)   # exact lattice values
    report = ijb.evaluate_scores(labels, ours, rule)
    assert report["tar_at_far"] == reference_tar(labels, expected, rule)  # identical, not approx
    assert len(set(report["tar_at_far"].values())) > 2                # a non-trivial reading


def test_template_features_equal_float64_reference_to_1e6():
    """Random features, several medias per template, detector scores, images in random order."""
    rng = np.random.default_rng(5)
    n, dim = 3000, 64
    templates = rng.integers(0, 150, n) * 3 + 11
    medias = templates * 10 + rng.integers(0, 4, n)
    feats = rng.standard_normal((n, 2 * dim)).astype(np.float32) + 0.3
    det = rng.uniform(0.2, 1.0, n).astype(np.float32)
    tfeats, tids = ijb.template_features(feats, det, templates, medias)
    reference = reference_templates(feats, det, templates, medias)
    assert tids.tolist() == sorted(reference)
    np.testing.assert_allclose(tfeats, np.stack([reference[t] for t in tids]), rtol=0, atol=1e-6)
    # a float64 copy and a memmap-like non-float32 input give the same features
    again, _ = ijb.template_features(feats.astype(np.float64), det, templates, medias)
    np.testing.assert_allclose(again, tfeats, rtol=0, atol=1e-7)


def test_roc_is_sklearn_roc_curve_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 300))
        labels = rng.integers(0, 2, n).astype(np.int8)
        labels[:2] = [0, 1]
        kind = trial % 5
        if kind == 0:       # few distinct values: ties across both classes
            scores = rng.integers(-3, 4, n).astype(np.float32) * 0.25
        elif kind == 1:     # distinct float32
            scores = rng.standard_normal(n).astype(np.float32)
        elif kind == 2:     # float64 with ties
            scores = np.round(rng.standard_normal(n), 1)
        elif kind == 3:     # +0.0 and -0.0 are one threshold
            scores = np.where(rng.random(n) < 0.5, 0.0, -0.0)
        else:               # long collinear runs (drop_intermediate) and integer scores
            scores = np.repeat(np.arange(n // 2 + 1), 2)[:n]
            labels = (scores % 3 == 0).astype(np.int64)
            labels[:2] = [0, 1]
        ours, sk = ijb.roc(labels, scores), roc_curve(labels, scores)
        for mine, theirs in zip(ours, sk):
            assert mine.dtype == theirs.dtype
            np.testing.assert_array_equal(mine, theirs)
    assert ijb.roc(np.array([0, 1]), np.array([0.5, 0.5]))[0].tolist() == [0.0, 1.0]


def test_roc_rejects_bad_input():
    with pytest.raises(ValueError, match="both genuine"):
        ijb.roc(np.ones(4, np.int8), np.arange(4.0))
    with pytest.raises(ValueError, match="0 \\(impostor\\) or 1"):
        ijb.roc(np.array([0, 1, 2]), np.arange(3.0))
    with pytest.raises(ValueError, match="NaN or inf"):
        ijb.roc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="must be \\[P\\]"):
        ijb.roc(np.array([0, 1]), np.zeros(3))


@pytest.mark.parametrize("method", ["sampled", "dense"])
def test_pair_scores_edge_cases_equal_float64_dots(method):
    """Unsorted pair list, repeated pairs (both orders), self pairs, templates in no pair,
    one block, blocks of 1 template, blocks smaller than the template count."""
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((37, 24)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.sort(rng.choice(5000, 37, replace=False))
    used = rng.choice(37, 30, replace=False)                    # 7 templates in no pair
    rows = used[rng.integers(0, 30, (500, 2))]
    rows[:6] = [[3, 3], [used[0], used[1]], [used[1], used[0]], [used[0], used[1]],
                [36, 0], [0, 36]]
    rows = np.concatenate([rows, rows[::-1][:50]])              # a reversed block of repeats
    pairs = ids[rows]
    assert not (np.diff(pairs[:, 0]) >= 0).all()                # not sorted
    want = np.einsum("ij,ij->i", vecs[rows[:, 0]].astype(np.float64), vecs[rows[:, 1]])
    for block in (1, 4, 36, 37, 1000):
        got = ijb.score_pairs(vecs, ids, pairs, method=method, block_rows=block,
                              block_cols=block)
        assert got.dtype == np.float32 and got.shape == (len(pairs),)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert got[1] == got[2] == got[3] and got[4] == got[5]  # repeats and swaps agree
    sorted_rows = np.argsort(pairs[:, 0], kind="stable")        # a sorted list gives the same
    np.testing.assert_array_equal(
        ijb.score_pairs(vecs, ids, pairs[sorted_rows], method=method),
        ijb.score_pairs(vecs, ids, pairs, method=method)[sorted_rows])
    assert ijb.score_pairs(vecs, ids, np.zeros((0, 2), dtype=np.int64), method=method).shape \
        == (0,)


def test_pair_tiles_group_by_block_then_row():
    rng = np.random.default_rng(2)
    first, second = rng.integers(0, 50, 3000), rng.integers(0, 50, 3000)
    order, indptr, offsets, used = ijb.pair_tiles(first, second, 50, 8)
    assert used == 8 and indptr.shape == (7 * 50 + 1,) and indptr[-1] == 3000
    assert sorted(order.tolist()) == list(range(3000))
    key = (second // 8) * 50 + first
    assert (np.diff(key[order]) >= 0).all()                     # grouped by (block, row)
    same = np.diff(key[order]) == 0
    assert (np.diff(order)[same] > 0).all()                     # stable inside a group
    np.testing.assert_array_equal(offsets - 1, second[order] % 8)
    np.testing.assert_array_equal(indptr, np.searchsorted(key[order], np.arange(351)))
    # many templates, few pairs: the block grows until the key count is bounded
    _, indptr, _, used = ijb.pair_tiles(np.array([0, 5]), np.array([9, 3]), 1 << 20, 16)
    assert indptr.size - 1 <= 4 * 2 + (1 << 20) and used > 16


def test_template_rows_edge_ids():
    with_zero = np.array([0, 4, 9])
    assert ijb.template_rows(with_zero, np.array([[9, 0], [4, 4]])).tolist() == [[2, 0], [1, 1]]
    with pytest.raises(ValueError, match="template id -3 has no features"):
        ijb.template_rows(with_zero, np.array([0, -3]))
    with pytest.raises(ValueError, match="template id 10 has no features"):
        ijb.template_rows(with_zero, np.array([10, 0]))
    with pytest.raises(ValueError, match="template id -1 has no features"):
        ijb.template_rows(np.array([2, 4]), np.array([4, -1]))
    with pytest.raises(ValueError, match="method must be one of"):
        ijb.score_pairs(np.eye(3, dtype=np.float32), with_zero, np.array([[0, 4]]),
                        method="gemm")
    with pytest.raises(ValueError, match=r"pairs must be \[P, 2\]"):
        ijb.score_pairs(np.eye(3, dtype=np.float32), with_zero, np.array([0, 4]))
