"""arcface_torch-style config loading, with validation upstream lacks.

``get_config("configs/ms1mv2_mbf_adadistill")`` loads ``configs/base.py``, then the job file, and
merges them like arcface_torch; unlike upstream, a job key that neither base nor the plugin's
distillation defaults define is an error naming the closest valid key, and key fields are
type-checked.  ``output`` None becomes ``work_dirs/<name>``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from easydict import EasyDict

from plugins.config_defaults import (ARCFACE_JOB_KEYS, DISTILL_DEFAULTS, apply_distill_defaults,
                                     check_types, unknown_key_message)


def _job_name(config_arg: str) -> str:
    norm = config_arg.replace("\\", "/")
    if not norm.startswith("configs/"):
        raise ValueError(f"config argument must be 'configs/<name>' (like arcface_torch), "
                         f"got {config_arg!r}")
    name = norm[len("configs/"):]
    name = name[:-3] if name.endswith(".py") else name
    if not name or "/" in name or name == "base":
        raise ValueError(f"config argument must name a job file configs/<name>.py, "
                         f"got {config_arg!r}")
    return name


def _load_module_config(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_kdface_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ValueError(f"{path}: defines no 'config' (an easydict named config is expected)")
    return dict(module.config)


@contextmanager
def _configs_importable(root: str) -> Iterator[None]:
    """Let a job file ``from configs.<paper job> import config`` (arcface_torch style) resolve to
    ``root/configs`` (with or without an ``__init__.py``): while loading, ``configs`` is the
    package of that folder; the modules cached before are put back afterwards."""
    def cached() -> Dict[str, Any]:
        return {n: m for n, m in sys.modules.items() if n == "configs" or n.startswith("configs.")}

    saved = cached()
    for name in saved:
        del sys.modules[name]
    package = types.ModuleType("configs")
    package.__path__ = [os.path.abspath(os.path.join(root, "configs"))]
    sys.modules["configs"] = package
    try:
        yield
    finally:
        for name in cached():
            del sys.modules[name]
        sys.modules.update(saved)


# The file patches/install_into_fork.py writes into an older fork: the keys of our base that
# the fork's configs/base.py lacks (merged under it; the fork's values win).
BASE_SUPPLEMENT = "kdface_base.py"
# base keys train_distill.py reads (a fork's base of 2021 .. 2022-05 lacks some of them)
REQUIRED_BASE_KEYS = ("margin_list", "network", "resume", "output", "embedding_size",
                      "sample_rate", "interclass_filtering_threshold", "fp16", "batch_size",
                      "optimizer", "lr", "momentum", "weight_decay", "verbose", "frequent",
                      "gradient_acc", "seed", "num_workers")
# every key of an arcface_torch base config of today (a job may set any of them)
ARCFACE_BASE_KEYS = REQUIRED_BASE_KEYS + (
    "save_all_states", "dali", "dali_aug", "using_wandb", "wandb_key", "suffix_run_name",
    "wandb_entity", "wandb_project", "wandb_log_all", "save_artifacts", "wandb_resume", "notes")
INSTALL_HINT = ("this fork's configs/base.py predates the key; `python "
                "patches/install_into_fork.py <this arcface_torch folder>` writes "
                f"configs/{BASE_SUPPLEMENT} with the base keys it lacks")


def get_config(config_arg: str, root: str = ".") -> EasyDict:
    """Load ``configs/base.py`` (+ ``configs/kdface_base.py`` where the install wrote one) +
    ``configs/<name>.py`` below ``root`` into an EasyDict.

    Raises FileNotFoundError for a missing file and ValueError for an unknown key (with the
    closest valid key), a value of the wrong type, or a base key train_distill.py reads that
    neither base file sets.
    """
    name = _job_name(config_arg)
    base_path = os.path.join(root, "configs", "base.py")
    supplement_path = os.path.join(root, "configs", BASE_SUPPLEMENT)
    job_path = os.path.join(root, "configs", f"{name}.py")
    with _configs_importable(root):
        base = _load_module_config(base_path)
        supplement = _load_module_config(supplement_path) \
            if os.path.isfile(supplement_path) else None
        job = _load_module_config(job_path)
    base = {**(supplement or {}), **base}
    hint = f" ({INSTALL_HINT})" if supplement is None else f"; set it in {supplement_path}"
    known = set(base) | set(ARCFACE_JOB_KEYS) | set(DISTILL_DEFAULTS)
    for key in job:
        if key not in known:
            raise ValueError(unknown_key_message(key, job_path, known)
                             + (hint if key in ARCFACE_BASE_KEYS else ""))
    missing = [key for key in REQUIRED_BASE_KEYS if key not in base and key not in job]
    if missing:
        raise ValueError(f"{base_path}: lacks the base key(s) {missing} that train_distill.py "
                         f"reads{hint}")
    cfg = dict(base)
    cfg.update(job)
    apply_distill_defaults(cfg)
    check_types(cfg, job_path)
    if cfg.get("output") is None:
        cfg["output"] = os.path.join("work_dirs", name)
    cfg["config_name"] = name
    return EasyDict(cfg)
