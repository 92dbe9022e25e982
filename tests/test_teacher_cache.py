"""The teacher-embedding cache: format, build (resumable, distributed), validation, lookup."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from easydict import EasyDict

from data.dataset import FaceRecordDataset
from tools.synthetic import write_train_set
from engine.teacher_cache_build import build_from_config, build_teacher_cache
from plugins.teacher_cache import (class_mean_classifier_from_cache, expected_meta,
                                   open_teacher_cache)
from plugins.backbones import resolve_model
from plugins.teacher import build_teacher
from plugins.teacher_cache import (EMBEDDINGS_FILE, LABELS_FILE, META_FILE, TeacherEmbeddingCache,
                                   cache_identity, dataset_fingerprint)
from tests.distributed_harness import run_distributed

DIM = 32
IDS, PER_ID = 3, 3          # 9 images
CHUNK, BATCH = 4, 3         # chunks [0,4) [4,8) [8,9); batches [0,1,2] [3] [4,5,6] [7] [8]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    data = str(root / "data")
    write_train_set(data, num_ids=IDS, images_per_id=PER_ID, seed=0)
    torch.manual_seed(0)
    model = resolve_model("tiny_t", num_features=DIM)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 3, 112, 112))
    checkpoint = str(root / "teacher.pt")
    torch.save(model.state_dict(), checkpoint)
    teacher = build_teacher("tiny_t", checkpoint, embedding_size=DIM)
    dataset = FaceRecordDataset(data, flip=False)
    meta = cache_identity(teacher.digest, "tiny_t", data, len(dataset), DIM)
    caches = {}
    for dtype in ("float32", "float16"):
        caches[dtype] = build_teacher_cache(teacher, dataset, str(root / dtype), meta,
                                            batch_size=BATCH, num_workers=0, chunk_size=CHUNK,
                                            dtype=dtype, progress=False)
    return EasyDict(root=root, data=data, checkpoint=checkpoint, teacher=teacher,
                    dataset=dataset, meta=meta, caches=caches)


def _reference(setup):
    """Teacher embeddings [N, 2, D] of every image and its mirror, one forward per view."""
    images = torch.stack([setup.dataset[i][0] for i in range(len(setup.dataset))])
    return torch.stack([setup.teacher(images), setup.teacher(torch.flip(images, dims=[3]))], 1)


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read()
            for name in (EMBEDDINGS_FILE, LABELS_FILE, META_FILE)}


def _build(setup, path, teacher=None, **options):
    kwargs = dict(batch_size=BATCH, num_workers=0, chunk_size=CHUNK, dtype="float32",
                  progress=False)
    kwargs.update(options)
    return build_teacher_cache(teacher or setup.teacher, setup.dataset, str(path), setup.meta,
                               **kwargs)


def test_lookup_equals_the_teacher_on_plain_and_mirrored_images(setup):
    reference = _reference(setup)
    n = len(setup.dataset)
    index = torch.arange(n).repeat(2)
    flipped = torch.arange(2 * n) >= n
    expected = torch.cat([reference[:, 0], reference[:, 1]])
    exact = TeacherEmbeddingCache(setup.caches["float32"], expect=setup.meta)
    half = TeacherEmbeddingCache(setup.caches["float16"], expect=setup.meta)
    got = exact.lookup(index, flipped)
    assert got.dtype == torch.float32 and got.shape == (2 * n, DIM)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half.lookup(index, flipped), expected, rtol=1e-3, atol=2e-3)
    assert half.table.dtype == np.float16 and exact.table.dtype == np.float32
    np.testing.assert_array_equal(exact.labels, setup.dataset.labels)
    # the training path: a flipping dataset's items, looked up by (index, flipped)
    flipping = FaceRecordDataset(setup.data, flip=True, seed=5)
    items = [flipping[i] for i in range(n)]
    assert 0 < sum(it[3] for it in items) < n
    images = torch.stack([it[0] for it in items])
    idx = torch.tensor([it[2] for it in items])
    flips = torch.tensor([it[3] for it in items])
    torch.testing.assert_close(exact.teacher_embeddings(images, idx, flips),
                               setup.teacher.teacher_embeddings(images, idx, flips),
                               rtol=1e-5, atol=1e-5)
    meta = json.load(open(os.path.join(setup.caches["float16"], META_FILE)))
    assert meta["complete"] is True and meta["num_images"] == n and meta["dtype"] == "float16"
    # the files are plain .npy arrays
    assert np.load(os.path.join(setup.caches["float32"], EMBEDDINGS_FILE)).shape == (n, 2, DIM)
    with pytest.raises(IndexError, match=r"has 9 images, got index range \[0, 9\]"):
        exact.lookup(torch.tensor([0, 9]), torch.tensor([False, False]))


def test_build_rows_are_the_two_view_forward_bit_for_bit(setup):
    """Row i of a float32 cache is, to the bit, the teacher's output for image i and for its
    mirror in the build's one forward of ``cat(batch, flip(batch))`` (batches [0,1,2] [3] [4,5,6]
    [7] [8]: they never cross a chunk); the float16 cache is that, rounded once."""
    images = torch.stack([setup.dataset[i][0] for i in range(len(setup.dataset))])
    expected = torch.empty(len(images), 2, DIM)
    for start, stop in ((0, 3), (3, 4), (4, 7), (7, 8), (8, 9)):
        x = images[start:stop]
        both = setup.teacher(torch.cat([x, torch.flip(x, dims=[3])]))
        expected[start:stop, 0], expected[start:stop, 1] = both[:stop - start], both[stop - start:]
    exact = TeacherEmbeddingCache(setup.caches["float32"], expect=setup.meta)
    half = TeacherEmbeddingCache(setup.caches["float16"], expect=setup.meta)
    assert np.array_equal(exact.table, expected.numpy())
    assert np.array_equal(half.table, expected.numpy().astype(np.float16))
    # lookups: rows by index, slot by flip, float32 out, in the order asked, repeats allowed
    index = torch.tensor([8, 0, 8, 3, 5])
    flipped = torch.tensor([True, False, False, True, True])
    want = expected[index, flipped.long()]
    assert torch.equal(exact.lookup(index, flipped), want)
    assert torch.equal(exact.teacher_embeddings(None, index, flipped), want)
    got_half = half.lookup(index, flipped)
    assert got_half.dtype == torch.float32
    assert torch.equal(got_half, want.half().float())


def test_build_in_a_worker_equals_the_in_process_build(setup, tmp_path):
    """DataLoader workers (torch's collate) and the main process (numpy's stack into a C-order
    batch) feed the teacher the same batches: byte-identical caches."""
    with_worker = _files(_build(setup, tmp_path / "w", num_workers=1))
    in_process = _files(setup.caches["float32"])
    assert with_worker[EMBEDDINGS_FILE] == in_process[EMBEDDINGS_FILE]
    assert with_worker[LABELS_FILE] == in_process[LABELS_FILE]


def test_killed_build_resumes_byte_identical_without_recomputing(setup, tmp_path):
    calls = []

    def count_and_die(module, args):
        calls.append(args[0].shape[0])
        if die_after is not None and len(calls) > die_after:
            raise KeyboardInterrupt("simulated kill")

    handle = setup.teacher.register_forward_pre_hook(count_and_die)
    try:
        die_after = 3  # chunk 1 is half written: chunk 0 is done
        with pytest.raises(KeyboardInterrupt):
            _build(setup, tmp_path / "c")
        assert os.listdir(tmp_path / "c" / "chunks") == ["000000.done"]
        with pytest.raises(RuntimeError, match=r"incomplete \(1 of 3 chunks written\).*"
                                               r"--build-teacher-cache"):
            TeacherEmbeddingCache(str(tmp_path / "c"), expect=setup.meta)
        calls.clear()
        die_after = None
        _build(setup, tmp_path / "c")
        # chunks 1 (4 images) and 2 (1 image): 3 batches of image + mirror, nothing else
        assert calls == [6, 2, 2]
        calls.clear()
        _build(setup, tmp_path / "c")  # complete: returns at once
        assert calls == []
    finally:
        handle.remove()
    assert _files(tmp_path / "c") == _files(setup.caches["float32"])


_KILLED_BUILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from data.dataset import FaceRecordDataset
from engine.teacher_cache_build import build_teacher_cache
from plugins.teacher import build_teacher
from plugins.teacher_cache import cache_identity
data, checkpoint, path, ready = sys.argv[2:6]
teacher = build_teacher("tiny_t", checkpoint, embedding_size=32)
calls = []

def pause(module, args):  # the 4th forward: chunk 0 is marked, half of chunk 1 is written
    calls.append(1)
    if len(calls) == 4:
        open(ready, "w").close()
        time.sleep(600)

teacher.register_forward_pre_hook(pause)
dataset = FaceRecordDataset(data, flip=False)
meta = cache_identity(teacher.digest, "tiny_t", data, len(dataset), 32)
build_teacher_cache(teacher, dataset, path, meta, batch_size=3, num_workers=0, chunk_size=4,
                    dtype="float32", progress=False)
"""


def test_sigkilled_build_resumes_byte_identical(setup, tmp_path):
    path, ready = tmp_path / "c", tmp_path / "ready"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, repo, setup.data,
                             setup.checkpoint, str(path), str(ready)])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, "the build process died before the kill"
            assert time.time() < deadline, "the build process never reached its 4th batch"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.listdir(path / "chunks") == ["000000.done"]
    assert json.load(open(path / META_FILE))["complete"] is False
    with pytest.raises(RuntimeError, match=r"incomplete \(1 of 3 chunks written\)"):
        TeacherEmbeddingCache(str(path))
    _build(setup, path)
    assert _files(path) == _files(setup.caches["float32"])


def test_mismatched_cache_is_refused(setup):
    path = setup.caches["float32"]
    for key, value in (("teacher_digest", "sha256:other"), ("dataset_fingerprint", "idx:other"),
                       ("num_images", 10), ("embedding_size", 64), ("teacher_network", "r50")):
        with pytest.raises(ValueError, match=rf"made for another run:\n  {key}: cache has "
                                             rf".*this run expects {value!r}\n.*"
                                             rf"--build-teacher-cache"):
            TeacherEmbeddingCache(path, expect=dict(setup.meta, **{key: value}))
    with pytest.raises(ValueError, match=r"teacher_digest: .*\n  num_images: "):
        TeacherEmbeddingCache(path, expect=dict(setup.meta, teacher_digest="x", num_images=3))
    with pytest.warns(UserWarning, match="served anyway: force=True"):
        forced = TeacherEmbeddingCache(path, expect=dict(setup.meta, num_images=3), force=True)
    assert forced.num_images == len(setup.dataset)
    with pytest.warns(UserWarning, match="same fingerprint: served"):
        TeacherEmbeddingCache(path, expect=dict(setup.meta, dataset_path="/moved/data"))
    with pytest.raises(ValueError, match=r"unknown expect keys \['digest'\]"):
        TeacherEmbeddingCache(path, expect={"digest": "x"})
    with pytest.raises(FileNotFoundError, match="no teacher cache at .*meta.json missing"):
        TeacherEmbeddingCache(os.path.join(path, "nothing"))


def test_build_refuses_to_overwrite_another_cache_unless_asked(setup, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(setup.caches["float32"], path)
    other = dict(setup.meta, teacher_digest="sha256:another-teacher")
    with pytest.raises(ValueError, match=r"(?s)exists and was made for something else:\n  "
                                         r"teacher_digest: .*overwrite=True"):
        build_teacher_cache(setup.teacher, setup.dataset, str(path), other, batch_size=BATCH,
                            num_workers=0, chunk_size=CHUNK, dtype="float32", progress=False)
    with pytest.raises(ValueError, match=r"dtype: cache has 'float32', this run expects "
                                         r"'float16'"):
        _build(setup, path, dtype="float16")
    build_teacher_cache(setup.teacher, setup.dataset, str(path), other, batch_size=BATCH,
                        num_workers=0, chunk_size=CHUNK, dtype="float32", progress=False,
                        overwrite=True)
    rebuilt = TeacherEmbeddingCache(str(path), expect=other)
    np.testing.assert_array_equal(rebuilt.table, TeacherEmbeddingCache(
        setup.caches["float32"]).table)
    # a folder holding something else is never written into
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no meta.json"):
        _build(setup, stranger)
    # a dataset with random flips on is refused
    with pytest.raises(RuntimeError, match="build it with flip=False"):
        build_teacher_cache(setup.teacher, FaceRecordDataset(setup.data, flip=True, seed=5),
                            str(tmp_path / "flip"), setup.meta, batch_size=len(setup.dataset),
                            num_workers=0, chunk_size=CHUNK, progress=False)


def _distributed_build(rank, world, data, checkpoint, path):
    teacher = build_teacher("tiny_t", checkpoint, embedding_size=DIM)
    dataset = FaceRecordDataset(data, flip=False)
    meta = cache_identity(teacher.digest, "tiny_t", data, len(dataset), DIM)
    build_teacher_cache(teacher, dataset, path, meta, batch_size=BATCH, num_workers=0,
                        chunk_size=CHUNK, dtype="float32", progress=False)
    return sorted(os.listdir(os.path.join(path, "chunks")))


def test_two_process_build_equals_one_process_build(setup, tmp_path):
    path = str(tmp_path / "c")
    results = run_distributed(_distributed_build, world_size=2,
                              args=(setup.data, setup.checkpoint, path))
    assert results[0] == results[1] == [f"{c:06d}.done" for c in range(3)]
    single, double = _files(setup.caches["float32"]), _files(path)
    assert double[META_FILE] == single[META_FILE] and double[LABELS_FILE] == single[LABELS_FILE]
    # threads differ (1 per spawned rank): compare values to float tolerance, not bytes
    np.testing.assert_allclose(TeacherEmbeddingCache(path).table,
                               TeacherEmbeddingCache(setup.caches["float32"]).table,
                               rtol=1e-5, atol=1e-6)


def test_class_mean_classifier_from_cache(setup):
    cache = TeacherEmbeddingCache(setup.caches["float32"], expect=setup.meta)
    views = torch.nn.functional.normalize(_reference(setup), dim=2)
    labels = torch.from_numpy(setup.dataset.labels)
    expected = torch.stack([views[labels == c].reshape(-1, DIM).sum(0) for c in range(IDS)])
    expected = torch.nn.functional.normalize(expected, dim=1)
    got = class_mean_classifier_from_cache(cache, None, IDS, block=4)
    assert got.shape == (IDS, DIM)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(class_mean_classifier_from_cache(cache, labels, IDS), got)
    with pytest.raises(ValueError, match=r"labels must be \[9\]"):
        class_mean_classifier_from_cache(cache, labels[:3], IDS)
    with pytest.raises(ValueError, match="have no sample"):
        class_mean_classifier_from_cache(cache, None, IDS + 1)


def test_build_from_config_then_open_for_training(setup, tmp_path):
    cfg = EasyDict(rec=setup.data, num_classes=IDS, teacher_network="tiny_t",
                   teacher_checkpoint=setup.checkpoint, teacher_embedding_size=DIM,
                   teacher_cache=str(tmp_path / "c"), fp16=False, teacher_fp16=True,
                   batch_size=BATCH, num_workers=1, seed=0)
    build_from_config(cfg, chunk_size=CHUNK, dtype="float32")
    cache = open_teacher_cache(cfg, num_images=len(setup.dataset))
    assert "num_images" not in expected_meta(cfg)
    assert expected_meta(cfg, 9) == setup.meta
    np.testing.assert_array_equal(cache.table, TeacherEmbeddingCache(
        setup.caches["float32"]).table)
    with pytest.raises(ValueError, match="num_images: cache has 9, this run expects 8"):
        open_teacher_cache(cfg, num_images=len(setup.dataset) - 1)
    with pytest.raises(ValueError, match="config key 'teacher_cache' is not set"):
        build_from_config(dict(cfg, teacher_cache=None))


def test_dataset_fingerprint_follows_content_not_location(setup, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(setup.data, moved)
    assert dataset_fingerprint(str(moved)) == dataset_fingerprint(setup.data)
    with open(moved / "train.idx", "a") as handle:
        handle.write("999\t0\n")
    assert dataset_fingerprint(str(moved)) != dataset_fingerprint(setup.data)
    with pytest.raises(FileNotFoundError, match="config key 'rec'.*train.rec not found"):
        dataset_fingerprint(str(tmp_path))


class _Constant(torch.nn.Module):
    """A "teacher" whose every embedding entry is ``value``."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x):
        return self.value * torch.ones(x.shape[0], DIM)


def test_build_refuses_values_the_dtype_cannot_store(setup, tmp_path):
    from plugins.teacher import TeacherHook
    with pytest.raises(RuntimeError, match=r"images 0..2 are beyond float16 range "
                                           r"\(max \|x\| = 7e\+04\).*dtype='float32'"):
        _build(setup, tmp_path / "big", teacher=TeacherHook(_Constant(7e4)), dtype="float16")
    with pytest.raises(RuntimeError, match="images 0..2 are non-finite"):
        _build(setup, tmp_path / "nan", teacher=TeacherHook(_Constant(float("nan"))))
    _build(setup, tmp_path / "ok", teacher=TeacherHook(_Constant(7e4)), dtype="float32")
    assert TeacherEmbeddingCache(str(tmp_path / "ok")).lookup(
        torch.tensor([8]), torch.tensor([True])).eq(7e4).all()
