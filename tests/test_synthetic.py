"""Synthetic data generator: determinism, real formats, learnable identities, IJB alignment."""
from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest

from tools import synthetic as syn
from data.dataset import FaceRecordDataset
from data.image_codec import decode_rgb
from plugins.recordio import RecordReader


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _files(root):
    return {name: _read(os.path.join(root, name)) for name in sorted(os.listdir(root))}


def test_train_set_layout_and_determinism(tmp_path):
    info = syn.write_train_set(str(tmp_path / "a"), num_ids=3, images_per_id=2, seed=4)
    syn.write_train_set(str(tmp_path / "b"), num_ids=3, images_per_id=2, seed=4)
    syn.write_train_set(str(tmp_path / "c"), num_ids=3, images_per_id=2, seed=5)
    a, b, c = (_files(str(tmp_path / x)) for x in "abc")
    assert sorted(a) == ["property", "train.idx", "train.rec"]
    assert a == b and a["train.rec"] != c["train.rec"]
    assert a["property"] == b"3,112,112" and info["num_images"] == 6
    reader = RecordReader(str(tmp_path / "a" / "train.rec"))
    assert reader.keys == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]       # images, identities, header
    header, body = reader.read(0)
    assert (header.flag, header.label.tolist(), header.id, header.id2, body) == \
        (2, [7.0, 10.0], 0, 1, b"")
    for c_ in range(3):
        header, body = reader.read(7 + c_)
        assert (header.flag, header.label.tolist(), header.id, body) == \
            (2, [1.0 + 2 * c_, 3.0 + 2 * c_], 7 + c_, b"")
    header, body = reader.read(4)
    assert (header.flag, header.label, header.id, header.id2) == (0, 1.0, 4, 0)
    assert decode_rgb(body).shape == (112, 112, 3)
    ds = FaceRecordDataset(str(tmp_path / "a"))
    assert ds.keys.tolist() == [1, 2, 3, 4, 5, 6] and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.num_classes == 3 and info["labels"].tolist() == ds.labels.tolist()


def _thumb(img):
    """8x8 per-channel standardised thumbnail of the central 56 x 56 (the face)."""
    t = img[35:91, 28:84].astype(float).reshape(8, 7, 8, 7, 3).mean((1, 3))
    return ((t - t.mean((0, 1))) / t.std((0, 1))).reshape(-1)


def test_render_is_deterministic_and_identities_are_learnable():
    """Nearest class mean on face thumbnails of held-out images beats chance by far: images of
    one identity share structure; different images of one identity still differ."""
    num_ids, per_id = 10, 5
    imgs = [[syn.render_face(syn.identity_params(i, seed=0), np.random.default_rng([0, i, j]))
             for j in range(per_id)] for i in range(num_ids)]
    again = syn.render_face(syn.identity_params(3, seed=0), np.random.default_rng([0, 3, 1]))
    assert again.dtype == np.uint8 and again.shape == (112, 112, 3)
    np.testing.assert_array_equal(again, imgs[3][1])
    assert np.abs(imgs[3][0].astype(float) - imgs[3][1]).mean() > 10.0   # images vary
    thumbs = np.array([[_thumb(img) for img in row] for row in imgs])
    means = thumbs[:, :-1].mean(1)                                # 4 images per identity
    pred = np.argmin(((thumbs[:, -1, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == np.arange(num_ids)).mean() >= 0.6             # chance is 0.1
    with pytest.raises(ValueError, match="identity must be >= 0"):
        syn.identity_params(-1)


def test_verification_bin_format(tmp_path):
    path = str(tmp_path / "lfw.bin")
    syn.write_verification_bin(path, num_pairs=7, seed=2, num_ids=3)
    bins, issame = pickle.loads(_read(path))
    assert len(bins) == 14 and isinstance(bins[0], bytes)
    assert issame.count(True) == 3 and len(issame) == 7 and all(type(s) is bool for s in issame)
    assert decode_rgb(bins[5]).shape == (112, 112, 3)
    syn.write_verification_bin(str(tmp_path / "again.bin"), num_pairs=7, seed=2, num_ids=3)
    syn.write_verification_bin(str(tmp_path / "other.bin"), num_pairs=7, seed=2, num_ids=3,
                               variant=1)
    raw = _read(path)
    assert raw == _read(str(tmp_path / "again.bin")) and raw != _read(str(tmp_path / "other.bin"))
    with pytest.raises(ValueError, match="num_ids >= 2"):
        syn.write_verification_bin(path, num_pairs=2, num_ids=1)


def test_ijb_layout_and_landmark_alignment_round_trip(tmp_path):
    from insightface.utils.face_align import norm_crop
    root = str(tmp_path / "IJBB")
    info = syn.write_ijb(root, "IJBB", num_ids=3, templates_per_id=2, medias_per_template=2,
                         images_per_media=1, seed=1)
    meta = os.path.join(root, "meta")
    assert sorted(os.listdir(meta)) == ["ijbb_face_tid_mid.txt", "ijbb_name_5pts_score.txt",
                                        "ijbb_template_pair_label.txt"]
    tid_mid = [line.split() for line in _read(os.path.join(meta, "ijbb_face_tid_mid.txt"))
               .decode().splitlines()]
    marks = [line.split() for line in _read(os.path.join(meta, "ijbb_name_5pts_score.txt"))
             .decode().splitlines()]
    pairs = np.loadtxt(os.path.join(meta, "ijbb_template_pair_label.txt"), dtype=int)
    assert len(tid_mid) == len(marks) == info["num_images"] == 12
    assert [r[0] for r in tid_mid] == [r[0] for r in marks] == [f"{k}.jpg" for k in range(1, 13)]
    assert [int(r[1]) for r in tid_mid] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert [int(r[2]) for r in tid_mid] == list(range(1, 13))     # 2 media per template
    owner = info["templates"]
    assert owner.tolist() == [0, 0, 1, 1, 2, 2] and len(pairs) == info["num_pairs"] == 15
    np.testing.assert_array_equal(pairs[:, 2], owner[pairs[:, 0] - 1] == owner[pairs[:, 1] - 1])
    assert pairs[:, 2].sum() == 3 and all(0.0 < float(r[11]) <= 1.0 for r in marks)
    for k in (0, 7):
        img = decode_rgb(_read(os.path.join(root, "loose_crop", marks[k][0])))
        assert 150 <= img.shape[0] <= 200
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)       # scikit-image deprecation
            aligned = norm_crop(img[:, :, ::-1].copy(),
                                np.array(marks[k][1:11], float).reshape(5, 2))[:, :, ::-1]
        ident = syn.EVAL_FIRST_ID + int(owner[int(tid_mid[k][1]) - 1])
        face = syn.render_face(syn.identity_params(ident, 1),
                               syn._image_rng(1, syn._TAG_IJB, ident, k + 1))
        inner = (slice(20, 100), slice(20, 92))
        err = np.abs(aligned[inner].astype(float) - face[inner]).mean()
        shifted = np.abs(aligned[inner].astype(float) - np.roll(face, 3, axis=1)[inner]).mean()
        assert err < 10.0 and err < 0.6 * shifted, (err, shifted)  # JPEG + noise + resampling


def test_cli_writes_every_set(tmp_path, capsys):
    out = str(tmp_path / "synth")
    syn.main(["--out", out, "--num-ids", "2", "--images-per-id", "2", "--bins", "lfw,cfp_fp",
              "--num-pairs", "4", "--bin-ids", "3", "--ijb", "IJBC", "--ijb-ids", "2"])
    assert sorted(os.listdir(out)) == ["IJBC", "cfp_fp.bin", "lfw.bin", "property", "train.idx",
                                       "train.rec"]
    assert _read(os.path.join(out, "lfw.bin")) != _read(os.path.join(out, "cfp_fp.bin"))
    assert len(os.listdir(os.path.join(out, "IJBC", "loose_crop"))) == 16
    captured = capsys.readouterr()
    assert "wrote 4 images of 2 identities" in captured.out
    assert "train set" in captured.err                           # progress lines


def test_parallel_train_set_from_stdin_script_does_not_hang(tmp_path):
    """Spawned renderers need an importable main module; from `python -` they cannot start, so
    rendering falls back to this process instead of respawning dying workers forever."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"import sys; sys.path.insert(0, {repo!r})\n"
              f"from tools.synthetic import write_train_set\n"
              f"print(write_train_set({str(tmp_path / 'x')!r}, 2, 3, workers=2)['num_images'])\n")
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "6"


def test_parallel_rendering_writes_identical_files(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    syn.write_train_set(one, 3, 4, seed=7, workers=1)
    syn.write_train_set(two, 3, 4, seed=7, workers=2)
    for name in ("train.rec", "train.idx", "property"):
        with open(os.path.join(one, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read(), name
