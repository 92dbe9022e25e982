"""Configuration keys that distillation adds to an arcface_torch config, with their defaults.

They belong to the plugin, not to ``configs/base.py``: a fork's own base config lacks them, and
``apply_distill_defaults`` fills them in, so the same job configs load with the fork's
``utils/utils_config.get_config`` and with ours.  ``check_types`` rejects values of the wrong
type and removed keys; ``unknown_key_message`` names the closest valid key.  Each registered head
adds its own keys (``register_head(..., keys=...)`` in ``plugins/heads/``): they are merged in
here, so a method's keys are typed once, beside its head.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Mapping, MutableMapping, Tuple

from .heads import head_names
from .heads.registry import HeadSpec, on_register

# torch.compile modes config key 'compile' accepts besides False / True (engine/compiled.py)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

# key -> (default, one-line description)
DISTILL_DEFAULTS: Dict[str, Tuple[Any, str]] = {
    "distill": ("adadistill", "method: " + " | ".join(head_names())),
    "margin_scale": (64.0, "scale s of the margin softmax (ArcFace / CosFace)"),
    "teacher_network": ("r50", "teacher backbone name (fork's backbones first, then the bundled "
                               "ones); 'onnx' for an insightface .onnx recognition model"),
    "teacher_checkpoint": (None, "teacher backbone weights: arcface_torch backbone.pth / model.pt, "
                                 "or the .onnx file when teacher_network = 'onnx'"),
    "teacher_embedding_size": (512, "teacher embedding size"),
    "teacher_classifier": (None, "teacher classifier: checkpoint_gpu_*.pt folder or [C, D] file "
                                 "(fixed centers of arcdistill/cosdistill, optional initial "
                                 "AdaDistill centers, GKD teacher logits)"),
    "teacher_fp16": (True, "teacher forward under autocast (float16 on GPUs; a CPU teacher "
                           "stays fp32 unless amp_dtype names a dtype)"),
    "amp_dtype": ("auto", "autocast dtype of fp16 / teacher_fp16: auto (float16 + GradScaler on "
                          "GPUs, bfloat16 on CPU) | float16 (+ GradScaler, CPU too) | bfloat16"),
    "channels_last": (None, "channels_last student and batches: None = on GPUs only, True, False"),
    "compile": (False, "torch.compile the student (train_distill.py): False | True (= 'default') "
                       "| 'reduce-overhead' (+ CUDA graphs, CUDA only) | "
                       "'max-autotune-no-cudagraphs' | 'max-autotune' (engine/compiled.py)"),
    "teacher_cache": (None, "folder of a teacher-embedding cache; None runs the teacher online"),
    "teacher_cache_force": (False, "serve a cache whose metadata (teacher, dataset, size) does "
                                   "not match the run, with a warning -- only if you know why"),
    "flip": (True, "random horizontal flip, the only augmentation (the cache relies on it)"),
    "nesterov": (False, "SGD with Nesterov momentum (the GKD recipe)"),
    "lr_reference_batch": (None, "global batch at which 'lr' holds; a run of global batch G "
                                 "uses lr * G / this (None: lr as written, no scaling)"),
    "warmup_lr": (0.0, "cosine schedule: lr of the first warm-up step (timm warmup_lr_init)"),
    "lr_min": (0.0, "cosine schedule: floor of the cosine (timm lr_min)"),
    "lr_schedule": ("polynomial", "polynomial (arcface_torch, with warmup) | step | cosine"),
    "lr_steps": ((7, 13, 19, 24), "0-based epochs from which the step schedule multiplies lr by 0.1"),
    "grad_clip": (5.0, "max gradient norm of the student; 0 disables clipping"),
    "save_every": (2000, "checkpoint every this many optimizer steps (and at each epoch end)"),
    "keep_checkpoints": (2, "how many step checkpoints to keep"),
    "max_nonfinite": (20, "stop after this many non-finite losses in a row (each one is skipped)"),
    "max_steps": (None, "stop after this many optimizer steps (demos and tests); None: num_epoch"),
    "skip_bad_records": (False, "skip undecodable records (counted and logged) instead of failing"),
    "start_over": (False, "a fresh run into an output folder holding checkpoints deletes them "
                          "(otherwise it refuses; --start-over on the command line)"),
}

# Keys that existed once and were removed: key -> why, and what to do.  A config that still sets
# one is refused (ValueError naming the key), never silently ignored.
REMOVED_KEYS: Dict[str, str] = {
    "grad_reduction": (
        "every training path now gives the student the gradient of the "
        "global-batch mean loss, the same on any GPU count -- which is what upstream "
        "arcface_torch does too (PartialFC_V2 multiplies the gathered embedding gradient by the "
        "world size before DDP averages), so its old 'arcface_torch' mode (gradient / W) "
        "reproduced no upstream behaviour; delete the line"),
}

# Keys that arcface_torch's job configs add to its base config.
ARCFACE_JOB_KEYS = ("rec", "num_classes", "num_image", "num_epoch", "warmup_epoch", "val_targets")

METHODS = tuple(head_names())

# key -> accepted types, for the fields whose type errors would otherwise surface late.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_OPT_STR = (str, type(None))
_SEQ = (list, tuple)
KEY_TYPES: Dict[str, tuple] = {
    "num_classes": _INT, "num_image": _INT, "num_epoch": _INT, "warmup_epoch": _NUM,
    "batch_size": _INT, "embedding_size": _INT, "lr": _NUM, "momentum": _NUM,
    "weight_decay": _NUM, "sample_rate": _NUM, "fp16": _BOOL, "resume": _BOOL,
    "gradient_acc": _INT, "seed": _INT, "num_workers": (int, str), "frequent": _INT,
    "verbose": _INT,
    "network": _STR, "optimizer": _STR, "rec": _STR, "output": _OPT_STR, "margin_list": _SEQ,
    "val_targets": _SEQ,
    "lr_reference_batch": (int, type(None)), "warmup_lr": _NUM, "lr_min": _NUM,
    "distill": _STR, "margin_scale": _NUM, "teacher_network": _STR,
    "teacher_checkpoint": _OPT_STR, "teacher_embedding_size": _INT,
    "teacher_classifier": _OPT_STR, "teacher_fp16": _BOOL, "teacher_cache": _OPT_STR,
    "amp_dtype": _STR, "channels_last": (bool, type(None)), "compile": (bool, str),
    "teacher_cache_force": _BOOL, "flip": _BOOL,
    "lr_schedule": _STR, "lr_steps": _SEQ,
    "grad_clip": _NUM, "nesterov": _BOOL, "save_every": _INT, "keep_checkpoints": _INT,
    "max_nonfinite": _INT, "max_steps": (int, type(None)), "skip_bad_records": _BOOL,
    "start_over": _BOOL,
}

# count / frequency keys -> smallest valid value (0 would divide by zero or never happen)
KEY_MINIMUM: Dict[str, int] = {
    "num_classes": 1, "num_image": 1, "num_epoch": 1, "batch_size": 1, "embedding_size": 1,
    "gradient_acc": 1, "frequent": 1, "save_every": 1, "keep_checkpoints": 1,
    "max_nonfinite": 1, "max_steps": 1, "teacher_embedding_size": 1, "gkd_k": 1,
    "num_workers": 0, "verbose": 0, "warmup_epoch": 0, "gkd_warmup_epochs": 0,
}

CHOICES: Dict[str, Tuple[str, ...]] = {
    "distill": METHODS,
    "lr_schedule": ("polynomial", "step", "cosine"),
    "optimizer": ("sgd", "adamw"),
    "amp_dtype": ("auto", "float16", "bfloat16"),
    "compile": (False, True) + COMPILE_MODES,
}


def _add_head(spec: HeadSpec) -> None:
    """A head was registered: add its name to the ``distill`` choices and its keys (default,
    description, types, choices) to the tables (in place, so importers see them)."""
    global METHODS
    METHODS = tuple(head_names())
    CHOICES["distill"] = METHODS
    DISTILL_DEFAULTS["distill"] = ("adadistill", "method: " + " | ".join(METHODS))
    for key, value in spec.keys.items():
        DISTILL_DEFAULTS[key] = (value[0], value[1])
        KEY_TYPES[key] = value[2]
        if len(value) == 4:
            CHOICES[key] = value[3]


on_register(_add_head)


def apply_distill_defaults(cfg: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Fill every distillation key the config does not set with its default (in place)."""
    for key, (default, _) in DISTILL_DEFAULTS.items():
        if key not in cfg:
            cfg[key] = list(default) if isinstance(default, tuple) else default
    return cfg


def closest_key(key: str, known: Iterable[str]) -> str:
    """The known key closest to ``key`` as a hint (``''`` when nothing is close)."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return match[0] if match else ""


def removed_key_message(key: str, source: str) -> str:
    return f"{source}: config key '{key}' was removed: {REMOVED_KEYS[key]}"


def unknown_key_message(key: str, source: str, known: Iterable[str]) -> str:
    if key in REMOVED_KEYS:
        return removed_key_message(key, source)
    hint = closest_key(key, known)
    suggestion = f" -- did you mean '{hint}'?" if hint else ""
    return (f"{source}: unknown config key '{key}'{suggestion} "
            f"(valid keys are the ones of configs/base.py and plugins/config_defaults.py)")


def check_types(cfg: Mapping[str, Any], source: str) -> None:
    """Raise ValueError naming the key, its value and the expected type or choices (or why a
    removed key is refused)."""
    for key in REMOVED_KEYS:
        if key in cfg:
            raise ValueError(removed_key_message(key, source))
    for key, types in KEY_TYPES.items():
        if key not in cfg:
            continue
        value = cfg[key]
        # bool is an int subclass: an int field must not accept True/False
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{source}: config key '{key}' must be {names}, "
                             f"got {value!r} ({type(value).__name__})")
    for key, minimum in KEY_MINIMUM.items():
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
            raise ValueError(f"{source}: config key '{key}' must be >= {minimum}, got {value!r}")
    for key, choices in CHOICES.items():
        if key in cfg and cfg[key] not in choices:
            raise ValueError(f"{source}: config key '{key}' must be one of {list(choices)}, "
                             f"got {cfg[key]!r}")
    if isinstance(cfg.get("num_workers"), str) and cfg["num_workers"] != "auto":
        raise ValueError(f"{source}: config key 'num_workers' must be an int >= 0 or 'auto', "
                         f"got {cfg['num_workers']!r}")
    check_onnx_teacher_keys(cfg, source)


def check_onnx_teacher_keys(cfg: Mapping[str, Any], source: str) -> None:
    """``teacher_network = "onnx"`` and a ``.onnx`` ``teacher_checkpoint`` go together: refuse
    one without the other (an .onnx file cannot load into a torch backbone, and an ONNX teacher
    cannot read a state_dict)."""
    network, checkpoint = cfg.get("teacher_network"), cfg.get("teacher_checkpoint")
    is_onnx_file = isinstance(checkpoint, str) and checkpoint.lower().endswith(".onnx")
    if network == "onnx" and checkpoint is not None and not is_onnx_file:
        raise ValueError(f"{source}: config key 'teacher_checkpoint' = {checkpoint!r}: "
                         f"teacher_network = 'onnx' needs the teacher's .onnx recognition model")
    if is_onnx_file and network != "onnx":
        raise ValueError(f"{source}: config key 'teacher_checkpoint' = {checkpoint!r} is an ONNX "
                         f"model: set teacher_network = 'onnx' (got {network!r})")
