"""plugins/fork_data.py: a fork's own loader keyed in place -- it yields (img, label, index,
flipped) with the images and flips train_distill.py's dataset gives, in the main process and in
DataLoader workers -- and every loader that cannot be keyed refused by name (with the teacher
cache) or left as the fork made it (without).

The fork's dataset is the stand-in of upstream's ``MXFaceDataset`` (tests/upstream_standin.py:
the .rec decoded, then ``Compose([ToPILImage, RandomHorizontalFlip, ToTensor, Normalize])``).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
from easydict import EasyDict
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from data.dataset import FaceRecordDataset
from plugins.fork_data import is_keyed, keyed_loader
from tests.test_fork_recipe import load_fork_module
from tests.upstream_standin import write_upstream_standin

NUM_IMAGES, SEED = 12, 5


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(the stand-in's dataset module, the .rec folder)."""
    from tools.synthetic import write_train_set
    root = str(tmp_path_factory.mktemp("fork_data"))
    fork = write_upstream_standin(root)
    write_train_set(os.path.join(root, "data"), num_ids=4, images_per_id=3, seed=2)
    return load_fork_module(fork, "dataset.py", "standin_dataset"), os.path.join(root, "data")


def fork_loader(module, rec, num_workers=0, flip_p=0.5, shuffle=True):
    dataset = module.MXFaceDataset(rec)
    dataset.transform.transforms[1].p = flip_p
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=SEED) \
        if shuffle else None
    return DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers,
                      drop_last=True)


def job(**values):
    return EasyDict(dict(distill="adadistill", seed=SEED, flip=True, teacher_cache=None),
                    **values)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_keyed_loader_gives_train_distills_images_and_flips(standin, num_workers):
    module, rec = standin
    loader = fork_loader(module, rec, num_workers=num_workers)
    assert keyed_loader(job(), loader) is loader and is_keyed(loader)
    ours = FaceRecordDataset(rec, flip=True, seed=SEED)
    flips_seen = set()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)          # what the fork's loop does
        ours.set_epoch(epoch)
        seen = []
        for img, label, index, flipped in loader:
            for i in range(len(index)):
                expected = ours[int(index[i])]
                assert torch.equal(img[i], expected[0]), (epoch, int(index[i]))   # bitwise
                assert int(label[i]) == int(expected[1]) and bool(flipped[i]) == expected[3]
                flips_seen.add(bool(flipped[i]))
            seen += index.tolist()
        assert sorted(seen) == list(range(NUM_IMAGES))   # the fork's sampler: every image once
    assert flips_seen == {True, False}


def test_the_forks_random_flip_is_taken_out_and_flip_false_honoured(standin):
    module, rec = standin
    loader = fork_loader(module, rec, flip_p=1.0, shuffle=False)    # the fork would always flip
    keyed_loader(job(flip=False), loader)
    plain = FaceRecordDataset(rec, flip=False)
    for epoch in (0, 1):                 # no sampler epoch: the passes are counted
        for img, _, index, flipped in loader:
            assert not flipped.any()
            assert all(torch.equal(img[i], plain[int(k)][0]) for i, k in enumerate(index))
    # a sampler without set_epoch: the second pass draws the flips of epoch 1
    loader = fork_loader(module, rec, shuffle=False)
    keyed_loader(job(), loader)
    ours = FaceRecordDataset(rec, flip=True, seed=SEED)
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        flips = torch.cat([flipped for _, _, _, flipped in loader])
        assert flips.tolist() == [ours[i][3] for i in range(NUM_IMAGES)]


def test_a_forks_own_job_keeps_its_loader(standin):
    module, rec = standin
    loader = fork_loader(module, rec)
    assert keyed_loader(EasyDict(network="r50"), loader) is loader
    assert not is_keyed(loader) and "__getitems__" not in vars(loader.dataset)
    assert type(loader.dataset.transform.transforms[1]).__name__ == "RandomHorizontalFlip"
    img, label = next(iter(loader))
    assert img.shape == (4, 3, 112, 112)


class DaliLike:
    """What upstream's DALI branch returns: an iterator, not a DataLoader."""

    def __iter__(self):
        return iter(())


class Stream(IterableDataset):
    def __iter__(self):
        return iter(())


class ColorJitter:
    def __call__(self, image):
        return image


@pytest.mark.parametrize("make, says", [
    (lambda module, rec: DaliLike(), "the loader is a DaliLike, not a torch DataLoader"),
    (lambda module, rec: DataLoader(Stream(), batch_size=2),
     "its dataset Stream is iterable, not indexed"),
    (lambda module, rec: DataLoader(module.MXFaceDataset(rec), batch_size=None),
     "it has no BatchSampler"),
    ("jitter", "its transform applies ColorJitter: the cache holds one embedding per image"),
    ("imagenet", "normalises with mean [0.485, 0.456, 0.406]"),
])
def test_a_loader_that_cannot_be_keyed_is_refused_with_the_cache(standin, caplog, make, says):
    module, rec = standin
    if make == "jitter":
        loader = fork_loader(module, rec)
        loader.dataset.transform.transforms.insert(2, ColorJitter())
    elif make == "imagenet":
        loader = fork_loader(module, rec)
        loader.dataset.transform.transforms[3] = module.Normalize([0.485, 0.456, 0.406],
                                                                  [0.229, 0.224, 0.225])
    else:
        loader = make(module, rec)
    with pytest.raises(ValueError, match="config key 'teacher_cache' is set, but the fork's "
                                         "loader cannot yield the \\(index, flipped\\)") as error:
        keyed_loader(job(teacher_cache="cache"), loader)
    assert says in str(error.value) and "To adapt it: make the fork's loader a torch " \
        "DataLoader" in str(error.value) and "train_distill.py" in str(error.value)
    # without the cache: the fork's loader as it is, and flip = False named as not honoured
    with caplog.at_level(logging.WARNING, logger="kdface.fork_data"):
        assert keyed_loader(job(flip=False), loader) is loader
    assert not is_keyed(loader)
    assert [r.getMessage() for r in caplog.records] == [
        f"config key 'flip' = False is not honoured by the patched loop: the fork's loader "
        f"keeps its own augmentation ({str(error.value).split('by: ')[1].split('. To adapt')[0]})"]
