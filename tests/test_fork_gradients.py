"""The patched fork loop gives the student upstream's gradient on any number of ranks.

Upstream arcface_torch is GPU-count invariant: PartialFC_V2 multiplies the gathered embedding
gradient by the world size W and DDP then averages, so the backbone gets the gradient of the
global-batch MEAN loss on any W.  Our heads give each rank the exact local gradient of that mean;
the patched loop multiplies it by W before the fork's DDP averages (plugins/ddp_gradient.py).

On the stand-in of upstream's train_v2.py + partial_fc_v2.py (tests/upstream_standin.py: DDP
with upstream's fp16_compress_hook, gather backward x W), patched by patches/patch_train_v2.py,
real gloo ranks run the first step of the same global batch (8 images, 8 distinct classes) on 1,
2 and 4 ranks, with the fork's network ``fork_plain`` as student (resolved through the fork's
``get_model`` first; no BatchNorm, whose per-rank batch statistics would change the forward); the backbone gradient the loop hands to ``clip_grad_norm_`` is captured there:

- every method's gradient is the same on 1, 2 and 4 ranks;
- the cosdistill head with the centers the PartialFC_V2 job learns from (same table, same CosFace
  margin, s = 64) gives the PartialFC path's gradient, on every W;
- control: without the x W scaling, 2 ranks give half of it (the defect this fixes).

Gradients pass the fp16 compression hook as upstream's do: compared to 2e-3 of their largest
entry (fp16 keeps ~3 decimal digits).
"""
from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

from patches import patch_train_v2 as patcher
from tests.distributed_harness import run_distributed
from tests.upstream_standin import write_upstream_standin

NUM_CLASSES, DIM, GLOBAL_BATCH = 16, 64, 8
METHODS = ("partialfc", "cosdistill", "adadistill", "gkd", "feature_mse")

JOB = '''\
import os

from easydict import EasyDict as edict

config = edict()
{distill}config.network = "fork_plain"   # the fork's own network, no BatchNorm
config.embedding_size = {dim}
config.margin_list = (1.0, 0.0, 0.35)
config.rec = {rec!r}
config.num_classes = {classes}
config.num_image = {classes}
config.num_epoch = 1
config.warmup_epoch = 0
config.batch_size = {batch} // int(os.environ.get("WORLD_SIZE", "1"))
config.output = {output!r}
'''

DISTILL = '''\
config.distill = {method!r}
config.teacher_network = "tiny_t"
config.teacher_checkpoint = {teacher!r}
config.teacher_classifier = {table!r}
config.teacher_embedding_size = {dim}
config.margin_scale = 64.0
config.gkd_k = 4
config.gkd_warmup_epochs = 0
'''


def write_job(fork: str, root: str, name: str, method: str) -> None:
    # "partialfc": our job naming no method (distill = "none") trains the fork's own PartialFC_V2
    distill = 'config.distill = "none"\n' if method == "partialfc" else DISTILL.format(
        method=method, teacher=os.path.join(root, "teacher.pt"),
        table=os.path.join(root, "table.pt"), dim=DIM)
    with open(os.path.join(fork, "configs", name + ".py"), "w") as handle:
        handle.write(JOB.format(distill=distill, dim=DIM, rec=os.path.join(root, "data"),
                                classes=NUM_CLASSES, batch=GLOBAL_BATCH,
                                output=os.path.join(root, "out", name)))


@pytest.fixture(scope="module")
def standin_fork(tmp_path_factory):
    from tools.synthetic import write_train_set
    from plugins.backbones import get_model
    root = str(tmp_path_factory.mktemp("upstream_standin"))
    fork = write_upstream_standin(root)
    assert patcher.main([os.path.join(fork, "train_v2.py")]) == 0
    write_train_set(os.path.join(root, "data"), num_ids=NUM_CLASSES, images_per_id=1, seed=4)
    torch.manual_seed(0)
    torch.save(get_model("tiny_t", num_features=DIM).state_dict(), os.path.join(root, "teacher.pt"))
    torch.save(torch.nn.functional.normalize(torch.randn(NUM_CLASSES, DIM), dim=1),
               os.path.join(root, "table.pt"))
    for method in METHODS:
        write_job(fork, root, "job_" + method, method)
    return fork, root


class _Captured(Exception):
    """Raised by the capturing clip_grad_norm_ to end the run after the first backward."""


def _first_step_gradients(rank, world, fork, root, methods, scale):
    """Run the patched train_v2.py once per method in this rank; return the flat backbone
    gradient each run passes to clip_grad_norm_ (after DDP's reduction)."""
    os.chdir(fork)
    sys.path.insert(0, fork)
    import plugins.fork_loop
    import partial_fc_v2
    table = torch.load(os.path.join(root, "table.pt"), weights_only=True)

    def same_table(module):   # every learned class shard starts from rows of the same table
        for part in module.modules():
            weight = getattr(part, "weight", None)
            if hasattr(part, "class_start") and isinstance(weight, torch.nn.Parameter):
                with torch.no_grad():
                    weight.copy_(table[part.class_start:part.class_start + part.num_local])
        return module

    plain_init, plain_build = partial_fc_v2.PartialFC_V2.__init__, plugins.fork_loop.build_fork_head

    def init(self, *args, **kwargs):
        plain_init(self, *args, **kwargs)
        same_table(self)

    partial_fc_v2.PartialFC_V2.__init__ = init
    plugins.fork_loop.build_fork_head = lambda *a, **k: same_table(plain_build(*a, **k))
    if not scale:
        plugins.fork_loop.undo_ddp_average = lambda embeddings, model: embeddings
    captured = {}

    def capture(parameters, max_norm, *args, **kwargs):
        captured["grad"] = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
            for p in parameters])
        raise _Captured

    torch.nn.utils.clip_grad_norm_ = capture
    out = {}
    for method in methods:
        for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
            del sys.modules[name]   # the fork's get_config updates configs.base in place
        sys.argv = ["train_v2.py", "configs/job_" + method]
        try:
            runpy.run_path("train_v2.py", run_name="__main__")
        except _Captured:
            out[method] = captured.pop("grad")
        else:
            raise AssertionError(f"{method}: the loop never reached clip_grad_norm_")
    return out


@pytest.fixture(scope="module")
def gradients(standin_fork):
    fork, root = standin_fork
    return {world: run_distributed(_first_step_gradients, world,
                                   args=(fork, root, METHODS, True))
            for world in (1, 2, 4)}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-3) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_every_rank_holds_the_same_reduced_gradient(gradients):
    for world, ranks in gradients.items():
        for method in METHODS:
            for other in ranks[1:]:
                assert torch.equal(other[method], ranks[0][method]), (world, method)


@pytest.mark.parametrize("method", METHODS)
def test_patched_loop_gradient_is_the_same_on_1_2_and_4_ranks(gradients, method):
    one = gradients[1][0][method]
    assert float(one.abs().max()) > 1e-4   # a real gradient, not an empty one
    for world in (2, 4):
        got = gradients[world][0][method]
        assert close(got, one), (method, world, float((got - one).abs().max()),
                                 float(one.abs().max()), float(got.norm() / one.norm()))


def test_our_head_gives_the_partialfc_paths_gradient(gradients):
    """Same centers, same CosFace margin and scale: our cosdistill head in the patched loop and
    the fork's own PartialFC_V2 path give the same backbone gradient on every W."""
    for world in (1, 2, 4):
        ours, upstream = gradients[world][0]["cosdistill"], gradients[world][0]["partialfc"]
        assert close(ours, upstream), (world, float((ours - upstream).abs().max()))


def test_without_the_world_size_scale_two_ranks_get_half(standin_fork, gradients):
    fork, root = standin_fork
    unscaled = run_distributed(_first_step_gradients, 2,
                               args=(fork, root, ("cosdistill",), False))[0]["cosdistill"]
    one = gradients[1][0]["cosdistill"]
    assert close(unscaled, one / 2)
    assert not close(unscaled, one)
