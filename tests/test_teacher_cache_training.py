"""Training from the teacher-embedding cache = training with the online teacher; a cache made for
another teacher is refused; GKD without a classifier takes class means from the cache."""
import os

import pytest
import torch

from engine.teacher_cache_build import build_from_config
from engine.trainer import train
from tests.training_helpers import job_config


@pytest.fixture(scope="module")
def cache_dir(workdir):
    path = str(workdir / "teacher_cache_fp32")
    cfg = job_config(workdir, "cache_build", distill="adadistill", teacher_cache=path)
    build_from_config(cfg, dtype="float32")
    return path


@pytest.mark.parametrize("method", ["adadistill", "gkd"])
def test_cache_gives_the_online_teachers_training_run(workdir, cache_dir, method):
    online = job_config(workdir, f"online_{method}", distill=method, max_steps=6)
    cached = job_config(workdir, f"cached_{method}", distill=method, max_steps=6,
                        teacher_cache=cache_dir)
    a, b = train(online), train(cached)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    sa = torch.load(os.path.join(online.output, "model.pt"), weights_only=True)
    sb = torch.load(os.path.join(cached.output, "model.pt"), weights_only=True)
    # The cache's teacher forward runs at another batch size than the online one; the AVX-512
    # convolution kernels block by batch size, so the embeddings differ in the last bit (~1e-7).
    # GKD's loss (~60 here, 8x AdaDistill's) amplifies that to 1.9e-5 in one weight after 6
    # steps on an Intel Sapphire Rapids (with the AVX2 kernels, and on AMD EPYC: < 1e-5), so
    # GKD's weights are held to 1e-4 (5x that), its losses to the same 1e-4 as AdaDistill's.
    atol = 1e-4 if method == "gkd" else 1e-5
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=atol, msg=key)


def test_cache_of_another_teacher_is_refused(workdir, cache_dir):
    other = workdir / "other_teacher.pt"
    state = torch.load(workdir / "teacher.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, other)
    cfg = job_config(workdir, "wrong_cache", distill="adadistill", max_steps=2,
                     teacher_checkpoint=str(other), teacher_cache=cache_dir)
    with pytest.raises(ValueError, match="digest"):
        train(cfg)


def test_gkd_without_classifier_uses_class_means_from_the_cache(workdir, cache_dir):
    cfg = job_config(workdir, "gkd_means", distill="gkd", max_steps=3, teacher_classifier=None,
                     teacher_cache=cache_dir)
    summary = train(cfg)
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(summary["losses"])))
