"""What a fork's patched ``train_v2.py`` calls (patches/patch_train_v2.py writes the calls).

The fork's own loop keeps its DDP, logging, checkpoints and data pipeline; the plugin adds the
head, the teacher (online, or its cache), the student/teacher name resolution and the gradient
convention, and -- for the keys a job sets -- its recipe: the lr of every optimizer step,
Nesterov, momentum and the gradient clip (``plugins/fork_recipe.py``), the flips and the sample
keys of the cache (``plugins/fork_data.py``).  ``prepare_fork_config`` checks at start-up what the
loop can honour (patches/README.md lists every key): unsupported values are refused or warned
about by name, and keys the loop never reads, or recipe keys the job leaves unset (the fork's own
behaviour then), are dropped from the config so the fork's config dump shows only what is in
effect.  A job that sets no ``distill`` key is one of the fork's own: nothing here touches it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .builders import build_head, build_teacher_source, check_config, teacher_class_means
from .config_defaults import apply_distill_defaults, check_types
from .ddp_gradient import undo_ddp_average
from .fork_data import is_keyed
from .fork_recipe import RECIPE_KEYS
from .heads import head_spec

LOG = logging.getLogger("kdface.fork_loop")

# key -> (what the fork's loop does instead, predicate "the value is what the loop does anyway").
# arcface_torch's train_v2.py: num_epoch epochs, checkpoints at epoch ends (save_all_states), no
# guard against non-finite losses, its loader fails on a bad record, the student's trunk under
# float16 autocast when fp16 (bfloat16 on a CPU), no channels_last.
NOT_HONOURED: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "max_steps": ("the fork trains num_epoch full epochs", lambda v: v is None),
    "save_every": ("the fork's own checkpoints (arcface_torch: each epoch end)", lambda v: False),
    "keep_checkpoints": ("the fork's own checkpoints", lambda v: False),
    "max_nonfinite": ("the fork's own loop (no non-finite loss guard)", lambda v: False),
    "skip_bad_records": ("the fork's own loader (a bad record fails)", lambda v: v is False),
    "amp_dtype": ("the fork's fp16 (the student trunk under float16 autocast on GPUs, bfloat16 "
                  "on a CPU)", lambda v: v == "auto"),
    "channels_last": ("the fork's memory format (contiguous)", lambda v: v is False),
}
# the fork's PartialFC_V2 (distill = "none") builds its margin with its own scale (upstream: 64)
FORK_MARGIN_SCALE = 64.0


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def distill_method(cfg) -> str:
    """``cfg.distill``, or ``"none"`` for a fork job that sets no ``distill`` key."""
    return cfg.get("distill", "none")


def prepare_fork_config(cfg) -> None:
    """Start-up checks of a job in the patched loop (in place); a job without ``distill`` is
    left exactly as the fork loaded it.

    Raises ValueError for a removed key (``grad_reduction``), a wrong type, and everything
    ``check_config`` refuses.  Logs one warning per key the job sets to a value the fork's loop
    does not honour.  Leaves in the config the recipe keys (``plugins.fork_recipe.RECIPE_KEYS``)
    the job sets -- honoured -- and none it does not set: those follow the fork.
    """
    if "distill" not in cfg:
        return
    source = f"configs/{cfg.get('config_name', '<job>')}.py"
    set_by_job = {key for key in (*NOT_HONOURED, *RECIPE_KEYS) if key in cfg}
    apply_distill_defaults(cfg)
    check_types(cfg, source)
    if cfg.distill != "none":
        check_config(cfg)
    ignored = [(key, cfg[key], NOT_HONOURED[key][0]) for key in NOT_HONOURED
               if key in set_by_job and not NOT_HONOURED[key][1](cfg[key])]
    if cfg.distill == "none" and float(cfg.margin_scale) != FORK_MARGIN_SCALE:
        ignored.append(("margin_scale", cfg.margin_scale,
                        f"the fork's PartialFC_V2 margin scale (arcface_torch: "
                        f"{FORK_MARGIN_SCALE:g}); distill = 'none' trains the fork's own head"))
    if _is_rank0():
        for key, value, instead in ignored:
            LOG.warning("config key '%s' = %r is not honoured by the patched train_v2.py: it "
                        "uses %s (train with train_distill.py for the full recipe)",
                        key, value, instead)
    for key in (*NOT_HONOURED, *RECIPE_KEYS):   # out of the dump: what the fork does instead
        if key in NOT_HONOURED or key not in set_by_job:
            cfg.pop(key, None)


def model_builder(cfg, fork_get_model: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """The student's builder: the fork's ``get_model`` for its own jobs (no ``distill`` key);
    for ours ``plugins.backbones.resolve_model`` (the fork's names first, then the bundled ones;
    an unknown name lists the valid ones)."""
    if "distill" not in cfg:
        return fork_get_model
    from .backbones import resolve_model
    return resolve_model


def build_fork_head(cfg) -> nn.Module:
    """The plugin's head of ``cfg.distill``, as train_distill.py builds it: a method that may
    take class means (GKD) without ``teacher_classifier`` gets them from ``teacher_cache``."""
    cache = None
    if cfg.teacher_cache and head_spec(cfg.distill).teacher_classifier == "or_class_means":
        from .teacher_cache import open_teacher_cache
        cache = open_teacher_cache(cfg, force=cfg.teacher_cache_force)
    return build_head(cfg, teacher_classifier=teacher_class_means(cfg, cache) if cache else None)


def build_fork_teacher(cfg, backbone: nn.Module, loader: Any = None):
    """The teacher-embedding source on the backbone's device -- the frozen teacher, or with
    ``teacher_cache`` the cache, checked against the images of the fork's (keyed) ``loader`` --
    or None (no teacher / the fork's own job)."""
    if distill_method(cfg) == "none":
        return None
    num_images = None
    if cfg.teacher_cache:
        if not is_keyed(loader):
            raise ValueError("config key 'teacher_cache' is set, but the training loop's loader "
                             "was not keyed by plugins.fork_data.keyed_loader (it yields no "
                             "sample index and flip flag): patch train_v2.py again with "
                             "patches/patch_train_v2.py, or set teacher_cache = None")
        num_images = len(loader.dataset)
    return build_teacher_source(cfg, device=next(backbone.parameters()).device,
                                num_images=num_images)


def fork_head_loss(head: nn.Module, cfg, backbone: nn.Module, teacher: Optional[Any],
                   images: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                   epoch: int, sample_keys: Sequence[torch.Tensor] = (),
                   fork_args: Sequence[Any] = ()) -> torch.Tensor:
    """The loss of one step of the fork's loop.

    ``distill = "none"``: the fork's own ``head(embeddings, labels, *fork_args)`` untouched
    (PartialFC_V2 already scales its gather gradient by W; ``fork_args``: e.g. the optimizer a
    2022 PartialFC takes).  Otherwise the plugin's head on ``embeddings`` [B, D] whose gradient is
    multiplied by the backbone's DDP world size W (``plugins.ddp_gradient.undo_ddp_average``):
    after the fork's DDP averages, the backbone gets the gradient of the global-batch mean loss,
    the same on any W, like upstream's own path.  ``sample_keys``: ``(index [B], flipped [B])``
    from a keyed loader (``plugins/fork_data.py``), which the teacher cache looks up; the online
    teacher ignores them.
    """
    method = distill_method(cfg)
    if method == "none":
        return head(embeddings, labels, *fork_args)
    teacher_embeddings = None
    if teacher is not None:
        index, flipped = sample_keys if len(sample_keys) == 2 else (None, None)
        teacher_embeddings = teacher.teacher_embeddings(images, index, flipped).float()
    loss = head(undo_ddp_average(embeddings, backbone), labels, teacher=teacher_embeddings,
                epoch=epoch)
    if loss.requires_grad and replicated_parameters(head):
        if int(cfg.get("gradient_acc", 1)) != 1:
            raise ValueError(f"distill='{method}': the head holds parameters replicated on every "
                             f"rank ({', '.join(replicated_parameters(head))}), whose gradients "
                             f"are summed over ranks after each backward; the patched "
                             f"train_v2.py does that only with gradient_acc = 1 (got "
                             f"{cfg.gradient_acc}); train with train_distill.py instead")
        loss.register_hook(_reduce_after_backward(head))
    return loss


def replicated_parameters(head: nn.Module) -> Tuple[str, ...]:
    """Names of the head's trainable parameters that are not class-sharded (a copy on every
    rank, e.g. a FitNet regressor): their gradients need ``head.reduce_replicated_grads()``."""
    sharded = set(head.sharded_keys)
    return tuple(name for name, p in head.named_parameters()
                 if p.requires_grad and name not in sharded)


def _reduce_after_backward(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook on the loss that, once the backward it starts has finished, sums the head's
    replicated gradients over ranks: the fork's loop then clips and steps exact gradients."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        torch.autograd.Variable._execution_engine.queue_callback(head.reduce_replicated_grads)
        return grad
    return hook

