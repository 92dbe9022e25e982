"""FaceRecordDataset (fixtures, flips, bad records) and ResumableDistributedSampler."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from data.dataset import (FaceRecordDataset, ResumableDistributedSampler, make_loader,
                          read_property, steps_per_epoch)
from data.image_codec import decode_rgb
from plugins.recordio import RecordReader

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "recordio")
INSIGHTFACE = os.path.join(FIXTURES, "insightface_style")
IM2REC = os.path.join(FIXTURES, "im2rec_style")
with open(os.path.join(FIXTURES, "expected.json")) as _f:
    SUMMARY = json.load(_f)["insightface_style_summary"]


def test_insightface_layout_keys_labels_and_items():
    ds = FaceRecordDataset(INSIGHTFACE, flip=True, seed=3)
    assert ds.keys.tolist() == SUMMARY["image_keys"]
    assert ds.labels.tolist() == SUMMARY["labels"]
    assert len(ds) == SUMMARY["num_images"] and ds.num_classes == SUMMARY["num_classes"]
    reader = RecordReader(os.path.join(INSIGHTFACE, "train.rec"))
    flips = ds.flip_flags(0)
    assert flips.any() and not flips.all()     # 17 fair coins with this seed: both values occur
    for i in (0, 5, 16):
        img, label, index, flipped = ds[i]
        raw = decode_rgb(reader.read(SUMMARY["image_keys"][i])[1]).astype(np.float64)
        if flips[i]:
            raw = raw[:, ::-1]
        expected = (raw / 255.0 - 0.5) / 0.5
        assert img.dtype == torch.float32 and img.shape == (3, 112, 112)
        np.testing.assert_allclose(img.numpy().transpose(1, 2, 0), expected, atol=1e-6)
        assert label.dtype == torch.int64 and label.item() == SUMMARY["labels"][i]
        assert index == i and flipped == bool(flips[i])


def test_im2rec_layout_uses_every_idx_key_even_with_multi_float_record_0():
    # record 0 has flag 3 and an image: an image, not an InsightFace header record
    ds = FaceRecordDataset(IM2REC, flip=False)
    assert ds.keys.tolist() == [7, 2, 4, 3, 6, 5, 1, 0]          # .idx order
    assert ds.labels.tolist() == [1, 2, 1, 0, 0, 2, 1, 0]          # scalar or first float
    assert ds.num_classes == 3                                     # no property file: max + 1
    assert not ds[0][3]


def test_flip_decisions_are_a_function_of_seed_epoch_index():
    ds = FaceRecordDataset(INSIGHTFACE, seed=11)
    for epoch in (0, 1, 7):
        expected = np.random.default_rng([11, epoch]).random(17) < 0.5
        np.testing.assert_array_equal(ds.flip_flags(epoch), expected)
        ds.set_epoch(epoch)
        assert [ds[i][3] for i in range(17)] == expected.tolist()
    assert not np.array_equal(ds.flip_flags(0), ds.flip_flags(1))
    assert not FaceRecordDataset(INSIGHTFACE, flip=False).flip_flags(1).any()
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        ds.set_epoch(-1)


def test_persistent_worker_sees_set_epoch():
    """Flip decisions made in a (persistent) worker process equal the in-process ones."""
    ds = FaceRecordDataset(INSIGHTFACE, seed=5)
    sampler = ResumableDistributedSampler(len(ds), batch_size=4, num_replicas=1, rank=0, seed=2)
    loader = make_loader(ds, sampler, batch_size=4, num_workers=1, pin_memory=True, seed=0)
    assert loader.persistent_workers and not loader.pin_memory     # no CUDA here
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        flips = ds.flip_flags(epoch)
        seen = []
        for img, label, index, flipped in loader:
            assert img.shape == (4, 3, 112, 112)
            np.testing.assert_array_equal(flipped.numpy(), flips[index.numpy()])
            np.testing.assert_array_equal(label.numpy(), ds.labels[index.numpy()])
            seen += index.tolist()
        assert seen == sampler.permutation(epoch)[:16].tolist()


def _copy(tmp_path, src):
    dst = tmp_path / os.path.basename(src)
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    return str(dst)


def test_label_out_of_range(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"train\.rec: key 2, byte offset 8848: label 2\.0 is not "
                                         r"a class id in \[0, 2\).*\(2 bad record\(s\) in all; skip_bad=True drops them\)"):
        FaceRecordDataset(IM2REC, num_classes=2)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        ds = FaceRecordDataset(IM2REC, num_classes=2, skip_bad=True)
    assert ds.keys.tolist() == [7, 4, 3, 6, 1, 0] and ds.dropped == 2
    assert ds.labels.tolist() == [1, 1, 0, 0, 1, 0]
    assert "skipping 2 bad records" in caplog.text
    root = _copy(tmp_path, INSIGHTFACE)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        FaceRecordDataset(root, num_classes=0)
    with pytest.raises(ValueError, match=r"num_classes=7 but .*property says 5"):
        FaceRecordDataset(root, num_classes=7)
    with open(os.path.join(root, "property"), "w") as f:
        f.write("five,112,112")
    with pytest.raises(ValueError, match=r"property: expected 'num_classes,height,width'"):
        FaceRecordDataset(root)
    assert read_property(os.path.join(INSIGHTFACE, "property")) == (5, 112, 112)


def test_undecodable_image_raises_or_is_replaced(caplog):
    # key 5 of the im2rec fixture holds 53 bytes that are not an image (position 5 in .idx order)
    ds = FaceRecordDataset(IM2REC, flip=False)
    with pytest.raises(ValueError, match=r"im2rec_style/train\.rec: key 5, byte offset 33716: "
                                         r".*skip_bad=True replaces such records"):
        ds[5]
    ds = FaceRecordDataset(IM2REC, flip=True, skip_bad=True, seed=1)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        img, label, index, flipped = ds[5]
    assert index == 6 and label.item() == 1 and ds.skipped == 1    # the next record, key 1
    assert flipped == bool(ds.flip_flags(0)[6])                     # (index, flipped) name it
    assert "skipped 1 undecodable records so far" in caplog.text
    with pytest.raises(IndexError):
        ds[8]


def test_unreadable_records_fail_at_construction(tmp_path):
    root = _copy(tmp_path, IM2REC)
    with open(os.path.join(root, "train.rec"), "r+b") as f:
        f.seek(27564)                          # key 6
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"key 6, byte offset 27564: bad magic word"):
        FaceRecordDataset(root)
    ds = FaceRecordDataset(root, skip_bad=True)
    assert ds.keys.tolist() == [7, 2, 4, 3, 5, 1, 0] and ds.dropped == 1
    for name in ("im2rec_style", "insightface_style"):
        root = _copy(tmp_path / "t", os.path.join(FIXTURES, name))
        with open(os.path.join(root, "train.rec"), "r+b") as f:
            f.truncate(30000)                  # record 0 (written last) is gone: no layout
        with pytest.raises(ValueError, match=r"key 0, byte offset \d+: truncated file"):
            FaceRecordDataset(root, skip_bad=True)


# -- sampler ----------------------------------------------------------------------------------

def _rank_batches(n, b, world, epoch, consumed=0, seed=0):
    """Per step, the global batch gathered in rank order."""
    per_rank = []
    for rank in range(world):
        s = ResumableDistributedSampler(n, b, num_replicas=world, rank=rank, seed=seed)
        s.set_epoch(epoch, consumed)
        idx = list(s)
        assert len(idx) == len(s)
        per_rank.append(np.array(idx).reshape(-1, b))
    return np.concatenate(per_rank, axis=1)           # [steps, world * b]


def test_sampler_deals_contiguous_global_blocks():
    perm = np.random.default_rng([4, 3]).permutation(23)
    batches = _rank_batches(23, 3, world=2, epoch=3, seed=4)
    assert batches.shape == (3, 6)                     # 23 // 6 = 3 steps, 5 samples dropped
    np.testing.assert_array_equal(batches.reshape(-1), perm[:18])
    assert steps_per_epoch(23, 6) == 3
    other = _rank_batches(23, 3, world=2, epoch=4, seed=4)
    assert not np.array_equal(batches, other)


def test_sampler_same_global_batches_for_any_world_size():
    np.testing.assert_array_equal(_rank_batches(40, 8, world=1, epoch=2),
                                  _rank_batches(40, 4, world=2, epoch=2))
    np.testing.assert_array_equal(_rank_batches(40, 8, world=1, epoch=2),
                                  _rank_batches(40, 2, world=4, epoch=2))


def test_sampler_resume_mid_epoch_sees_exactly_the_rest():
    full = _rank_batches(50, 3, world=2, epoch=1)      # 8 steps of 6
    resumed = _rank_batches(50, 3, world=2, epoch=1, consumed=3 * 6)
    np.testing.assert_array_equal(resumed, full[3:])
    # resumed on one rank with the same global batch: the same remaining samples
    np.testing.assert_array_equal(_rank_batches(50, 6, world=1, epoch=1, consumed=18), full[3:])
    done = ResumableDistributedSampler(50, 3, num_replicas=2, rank=1)
    done.set_epoch(1, consumed=48)
    assert len(done) == 0 and list(done) == []


def test_sampler_unshuffled_defaults_and_errors():
    s = ResumableDistributedSampler(10, 2, shuffle=False)          # no process group: 1 rank
    assert (s.num_replicas, s.rank) == (1, 0) and list(s) == list(range(10))
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        ResumableDistributedSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="0 <= consumed <= 10"):
        s.set_epoch(0, consumed=11)
    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        steps_per_epoch(10, 0)


def test_loader_batches_follow_the_sampler():
    ds = FaceRecordDataset(INSIGHTFACE, flip=False)
    sampler = ResumableDistributedSampler(len(ds), 2, num_replicas=2, rank=1, seed=9)
    sampler.set_epoch(0, consumed=4)
    loader = make_loader(ds, sampler, batch_size=2, num_workers=0, pin_memory=False, seed=0)
    got = [index.tolist() for _, _, index, _ in loader]
    perm = sampler.permutation(0)
    assert got == [perm[4 + 4 * s + 2: 4 + 4 * s + 4].tolist() for s in range(3)]


# -- image codec ------------------------------------------------------------------------------

def test_codec_decoders_agree_and_bad_bytes_raise():
    from data.image_codec import decoder_name, encode_jpeg, get_decoder
    import cv2
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, 255 - xx * 3], axis=-1).astype(np.uint8)
    data = encode_jpeg(rgb, quality=95)
    assert decoder_name() == "simplejpeg"                 # fastest installed
    decoded = decode_rgb(data)
    assert decoded.shape == (48, 64, 3) and np.abs(decoded.astype(int) - rgb).mean() < 2.0
    for name in ("cv2", "pillow"):
        assert np.abs(get_decoder(name)(data).astype(int) - decoded).max() <= 1
    gray = cv2.imencode(".jpg", rgb[:, :, 0])[1].tobytes()  # single-channel JPEG -> 3 channels
    assert decode_rgb(gray).shape == (48, 64, 3)
    for bad, what in ((b"", "empty image data"), (b"not a jpeg", None), (data[:200], None)):
        with pytest.raises(ValueError, match=what):
            decode_rgb(bad)
    with pytest.raises(ValueError, match=r"encode_jpeg needs \[H, W, 3\] uint8 RGB"):
        encode_jpeg(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="unknown JPEG decoder 'turbo'"):
        get_decoder("turbo")


def test_png_record_decodes_through_the_fallback():
    import cv2
    from data.image_codec import decode_rgb
    rgb = np.zeros((112, 112, 3), dtype=np.uint8)
    rgb[10:20, 30:40] = (200, 100, 50)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    np.testing.assert_array_equal(decode_rgb(png.tobytes()), rgb)
    with pytest.raises(ValueError, match="undecodable image"):
        decode_rgb(b"\xff\xd8 not really a jpeg")
