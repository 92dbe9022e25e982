""".bin verification: 10-fold threshold logic by hand and against a loop implementation, XNorm,
the restricted unpickler, .bin round trips (Python 3 and Python 2 style pickles, numpy bins),
the trainer callback and the CLI."""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from eval import bin_verification as ver
from data.image_codec import decode_rgb, encode_jpeg
from eval.model_io import TorchEmbedder
from tools.synthetic import write_verification_bin
from plugins.backbones import get_model


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bins")
    write_verification_bin(str(root / "lfw.bin"), num_pairs=20, seed=0)
    write_verification_bin(str(root / "cfp_fp.bin"), num_pairs=20, seed=0, variant=1)
    return root


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return get_model("tiny_s", num_features=512).eval()


# --------------------------------------------------------------------------- accuracy

def test_kfold_accuracy_hand_computed_case():
    dist = np.array([0.2, 1.0, 2.0, 3.0, 0.4, 1.2, 0.1, 2.2, 1.4, 3.5])
    same = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    # fold 0 trains on pairs 5..9: thresholds 0.5 and 1.5 both get 4/5 -> the first (0.5) wins;
    # on pairs 0..4 it predicts [T, F, F, F, T] -> 4/5.  fold 1 trains on 0..4: 1.5 gets 5/5;
    # on pairs 5..9 it predicts [T, T, F, T, F] -> 4/5.
    accs, chosen = ver.kfold_accuracy(dist, same, nfolds=2, thresholds=np.array([0.5, 1.5, 2.5]))
    assert chosen.tolist() == [0.5, 1.5]
    assert accs.tolist() == [0.8, 0.8]
    # "same" needs dist < threshold, strictly
    accs, _ = ver.kfold_accuracy(np.array([1.0, 1.0]), np.array([True, True]), nfolds=2,
                                 thresholds=np.array([1.0]))
    assert accs.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="P >= nfolds=10"):
        ver.kfold_accuracy(dist[:5], same[:5])


def test_kfold_accuracy_matches_loop_implementation():
    rng = np.random.default_rng(3)
    same = rng.random(73) < 0.5
    dist = np.where(same, rng.uniform(0.2, 2.2, 73), rng.uniform(1.2, 3.8, 73))
    accs, chosen = ver.kfold_accuracy(dist, same)
    folds = np.array_split(np.arange(73), 10)       # sklearn KFold(shuffle=False) partition
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(73), test)
        best_acc, best_t = -1.0, None
        for t in np.arange(0, 4, 0.01):
            acc = np.mean((dist[train] < t) == same[train])
            if acc > best_acc:
                best_acc, best_t = acc, t
        assert chosen[k] == best_t
        assert accs[k] == np.mean((dist[test] < best_t) == same[test])
    assert 0.6 < accs.mean() < 1.0


def test_evaluate_embeddings_xnorm_and_flip_sum():
    # 10 pairs, D = 2: pair i = (a, a) for even i (same), (a, -a) for odd i (different)
    plain, mirrored, same = [], [], []
    for i in range(10):
        a = np.array([np.cos(i), np.sin(i)])
        plain += [3 * a, 3 * a if i % 2 == 0 else -3 * a]
        mirrored += [a, a if i % 2 == 0 else -a]
        same.append(i % 2 == 0)
    result = ver.evaluate_embeddings("toy", np.array(plain), np.array(mirrored), np.array(same))
    assert result.xnorm == pytest.approx((3 + 1) / 2)           # mean of plain and mirror norms
    assert result.accuracy == 100.0 and result.std == 0.0 and result.num_pairs == 10
    assert result.thresholds == [0.01] * 10    # d = 0 (same) or 4 (different): first best is 0.01


# --------------------------------------------------------------------------- loading

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(marker)], [True])))
    with pytest.raises(ValueError, match=r"evil\.bin: refused to load: global '(posix|os)\.system'"
                                         r" is forbidden"):
        ver.load_bin(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps((eval, ("1",))))  # a callable global, even a builtin one
    with pytest.raises(ValueError, match="global 'builtins.eval' is forbidden"):
        ver.restricted_load(str(path))
    path.write_bytes(pickle.dumps(bytes(b"ok"), protocol=2))  # protocol 2 bytes: _codecs.encode
    assert ver.restricted_load(str(path)) == b"ok"


def test_bin_round_trip_with_synthetic_writer(bin_dir):
    path = str(bin_dir / "lfw.bin")
    with open(path, "rb") as handle:
        bins, issame = pickle.load(handle)      # our own trusted test file
    data = ver.load_bin(path)
    assert data.name == "lfw" and data.images.shape == (40, 3, 112, 112)
    assert data.images.dtype == torch.uint8 and data.issame.tolist() == list(issame)
    for i in (0, 39):
        np.testing.assert_array_equal(data.images[i].numpy().transpose(1, 2, 0),
                                      decode_rgb(bins[i]))


def _python2_pickle(bins, issame):
    """What Python 2's pickle.dump((bins, issame_list), f, protocol=2) writes: str as BINSTRING."""
    out = [b"\x80\x02]q\x00("]
    for data in bins:
        out.append(b"T" + struct.pack("<I", len(data)) + data)
    out.append(b"e]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86q\x02.")
    return b"".join(out)


def test_python2_and_numpy_bins(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    jpegs = [encode_jpeg(img) for img in images]
    py2 = tmp_path / "py2.bin"
    py2.write_bytes(_python2_pickle(jpegs, [True, False]))
    with pytest.raises(UnicodeDecodeError):           # why the encoding='bytes' fallback exists
        pickle.loads(py2.read_bytes())
    data = ver.load_bin(str(py2))
    assert data.issame.tolist() == [True, False]
    np.testing.assert_array_equal(data.images[3].numpy().transpose(1, 2, 0), decode_rgb(jpegs[3]))
    # cv2.imencode-style uint8 arrays, numpy bool labels, and a 96 x 96 set (resized)
    small = [encode_jpeg(img[:96, :96]) for img in images]
    arrays = [np.frombuffer(b, dtype=np.uint8).reshape(-1, 1) for b in small]
    npy = tmp_path / "np.bin"
    npy.write_bytes(pickle.dumps((arrays, [np.bool_(True), np.bool_(True)])))
    data = ver.load_bin(str(npy))
    assert data.images.shape == (4, 3, 112, 112) and data.issame.tolist() == [True, True]


@pytest.mark.parametrize("content, message", [
    ((["a"], [True], [0.0]), r"expected a pickled \(bins, issame_list\) pair"),
    (([b"x"] * 3, [True]), r"3 images for 1 pairs; expected 2"),
    (([b"x"] * 2, [2]), "issame_list must be a flat list of booleans"),
    (([b"x"] * 2, [True]), r"image 0: "),
])
def test_bad_bin_files(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message):
        ver.load_bin(str(path))


# --------------------------------------------------------------------------- callback and CLI

class _Writer:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_callback_evaluates_logs_and_keeps_best(bin_dir, tiny, caplog):
    writer = _Writer()
    callback = ver.VerificationCallback(["lfw", "cfp_fp"], str(bin_dir), batch_size=16,
                                        summary_writer=writer)
    tiny.train()
    with caplog.at_level(logging.INFO, logger="eval.bin_verification"):
        results = callback(7, tiny)
    assert tiny.training                                   # mode restored
    expected = ver.verify(ver.load_bin(str(bin_dir / "lfw.bin")),
                          TorchEmbedder(tiny, autocast=False), batch_size=8)
    assert results["lfw"] == pytest.approx((expected.accuracy, expected.std, expected.xnorm))
    assert [c[0] for c in writer.calls] == ["lfw", "cfp_fp"] and writer.calls[0][2] == 7
    assert "[lfw][7]Accuracy-Flip:" in caplog.text and "[cfp_fp][7]XNorm:" in caplog.text
    callback.highest["lfw"] = 101.0                        # a better earlier result is kept
    callback(8, tiny)
    assert callback.highest["lfw"] == 101.0
    with pytest.raises(ValueError, match=r"agedb_30\.bin does not exist; .*config.val_targets"):
        ver.VerificationCallback(["agedb_30"], str(bin_dir))


def test_cli_prints_table_and_writes_json(bin_dir, tiny, tmp_path, capsys):
    torch.save(tiny.state_dict(), tmp_path / "model.pt")
    results = ver.main(["--model-prefix", str(tmp_path / "model.pt"), "--network",
                        "tiny_s", "--data-dir", str(bin_dir), "--targets",
                        "lfw,cfp_fp", "--json", str(tmp_path / "ver.json")])
    assert "Accuracy-Flip (%)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ver.json").read_text())
    assert list(saved["results"]) == ["lfw", "cfp_fp"]
    assert saved["results"]["lfw"]["accuracy"] == pytest.approx(results[0].accuracy)
