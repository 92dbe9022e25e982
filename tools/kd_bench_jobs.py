"""The work of the distillation-quality benchmark (bench/kd_quality.py), one function per job.

Each job runs in its own process with ONE intra-op thread and no DataLoader workers
(``pin_process``), so its numbers do not depend on how many jobs run beside it:

- ``make_data(task, root)``: the synthetic training set (``train.rec``), ``lfw.bin`` and an
  ``IJBC/`` folder, identities of the evaluation sets disjoint from training (tools/synthetic.py);
- ``train_teacher(job)``: the teacher alone, then its teacher-embedding cache (engine/trainer.py,
  engine/teacher_cache_build.py);
- ``train_and_eval(job)``: one student run (a method and a seed) through engine.trainer.train,
  evaluated by ``evaluate_model``: TAR@FAR on the synthetic IJB-C folder (eval/ijb.py, the
  published pipeline) and the 10-fold ``lfw.bin`` accuracy (eval/bin_verification.py).

The short regime's teacher is the demo's ``tiny_t``, its student ``kdb_student`` (a TinyFaceNet far
narrower than the demo's tiny_s); the converged regime's are ``kdb_patch_teacher`` and
``kdb_patch_student`` (tools/kd_bench_nets.py, registered by ``register_backbones``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Mapping

THREADS = 1


def pin_process(threads: int = THREADS, device: str = "cpu") -> None:
    """One intra-op (and inter-op) thread for this process: the results of a job are then the
    same whether it runs alone or beside another job (reduction order depends on threads).

    ``device``: ``"cpu"`` hides every GPU from this process before CUDA starts (the trainer and
    the cache build take a visible GPU); ``"cuda"`` requires one (RuntimeError otherwise)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    if device == "cpu" and torch.cuda.is_initialized():
        raise RuntimeError("kd-bench: CUDA was started in this process before pin_process; a "
                           "--device cpu job cannot hide the GPU any more (start jobs in fresh "
                           "processes, as bench/kd_quality.py does)")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"kd-bench --device cuda: no CUDA device is visible to this process "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                           f"use --device cpu or a CUDA build of torch on a GPU machine")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:      # already set (or parallel work started) in this process
        pass
    register_backbones()


def register_backbones() -> None:
    """The benchmark's networks (tools/kd_bench_nets.py): ``kdb_student``, ``kdb_patch_teacher``,
    ``kdb_patch_student``; the short regime's teacher is the registered ``tiny_t``."""
    from tools.kd_bench_nets import register
    register()


# --------------------------------------------------------------------------- data

def make_data(task: Mapping[str, Any], root: str) -> str:
    """Write the task's data into ``root`` once (a ``done.json`` marker, written last, holds the
    task); return ``root``.  Parallel rendering (``task['render_workers']``) gives identical
    files."""
    from tools.synthetic import write_ijb, write_train_set, write_verification_bin

    marker = os.path.join(root, "done.json")
    if os.path.isfile(marker):
        return root
    os.makedirs(root, exist_ok=True)
    start = time.time()
    variation = float(task.get("variation", 1.0))     # within-identity variation, every set
    write_train_set(root, task["num_ids"], task["images_per_id"], seed=task["data_seed"],
                    workers=task.get("render_workers", 1), verbose=True, variation=variation)
    write_verification_bin(os.path.join(root, "lfw.bin"), task["bin_pairs"],
                           seed=task["data_seed"], num_ids=task["bin_ids"], verbose=True,
                           variation=variation)
    write_ijb(os.path.join(root, "IJBC"), "IJBC", num_ids=task["ijb_ids"],
              templates_per_id=task["ijb_templates_per_id"],
              medias_per_template=task["ijb_medias_per_template"],
              images_per_media=task["ijb_images_per_media"],
              impostor_ratio=task["ijb_impostor_ratio"], seed=task["data_seed"], verbose=True,
              variation=variation)
    _write_json(marker, {"task": dict(task), "seconds": round(time.time() - start, 1)})
    return root


def _write_json(path: str, obj: Any) -> None:
    from plugins.atomic_io import save_text
    save_text(path, json.dumps(obj, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- config

def run_config(job: Mapping[str, Any]):
    """The trainer config (EasyDict) of one job: configs/base.py keys, the plugin's defaults,
    then ``job['config']`` (the task's shared keys plus the method's overrides)."""
    from easydict import EasyDict

    from plugins.config_defaults import apply_distill_defaults, check_types

    base: Dict[str, Any] = {}
    spec_path = os.path.join(job["repo"], "configs", "base.py")
    import importlib.util
    spec = importlib.util.spec_from_file_location("_kdb_base_config", spec_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base.update(dict(module.config))
    base.update(job["config"])
    apply_distill_defaults(base)
    check_types(base, f"kd_quality job {job['name']}")
    base["config_name"] = job["name"]
    # a job's folder without its result marker is an interrupted attempt at this same run
    # (the folder is named by the run's digest): its checkpoints go, the run starts over
    base["start_over"] = True
    return EasyDict(base)


# --------------------------------------------------------------------------- evaluation

ALIGNED_FILE = "aligned_{size}.npy"


def aligned_ijb_images(ijb_root: str, target: str = "IJBC", image_size: int = 112):
    """``(meta, uint8 [N, 3, S, S])``: every image of the IJB folder decoded and aligned
    (eval.ijb.AlignedFaceDataset), computed once and kept as ``<ijb_root>/aligned_<S>.npy``
    (written atomically, so runs side by side can race to create it)."""
    import numpy as np

    from plugins.atomic_io import save_npy
    from eval.ijb import AlignedFaceDataset, load_meta

    meta = load_meta(ijb_root, target)
    path = os.path.join(ijb_root, ALIGNED_FILE.format(size=image_size))
    if os.path.isfile(path):
        images = np.load(path, allow_pickle=False)
        if images.shape == (len(meta.names), 3, image_size, image_size):
            return meta, images
    dataset = AlignedFaceDataset(meta.image_dir, meta.names, meta.landmarks, meta.landmark_file,
                                 image_size=image_size)
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    save_npy(path, images)
    return meta, images


def ijb_tar_at_far(backbone, ijb_root: str, target: str = "IJBC",
                   fars=(1e-4, 1e-3, 1e-2), batch_size: int = 128) -> Dict[str, Any]:
    """TAR@FAR (percent, the published closest-FPR reading) of ``backbone`` on the IJB folder
    ``ijb_root``: keys ``tar@<far>`` (``far_key``), plus ``ijb_auc``, ``ijb_pairs``,
    ``ijb_genuine``.  Same features as eval.ijb.extract_features (each batch of ``batch_size``
    images embedded together with its mirrors), from the aligned images of
    ``aligned_ijb_images``."""
    import numpy as np
    import torch

    from eval.ijb import evaluate_scores, far_key, score_features
    from eval.model_io import TorchEmbedder

    embedder = TorchEmbedder(backbone, autocast=False, description="kd_quality")
    meta, images = aligned_ijb_images(ijb_root, target)
    parts = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size])
        feats = embedder(torch.cat([batch, batch.flip(3)])).numpy()
        parts.append(np.concatenate([feats[:len(batch)], feats[len(batch):]], axis=1))
    scores, _ = score_features(meta, np.concatenate(parts).astype(np.float32))
    report = evaluate_scores(meta.labels, scores, "closest", fars)
    out = {f"tar@{far_key(f)}": report["tar_at_far"][far_key(f)] for f in fars}
    out.update({"ijb_auc": report["auc"], "ijb_pairs": report["num_pairs"],
                "ijb_genuine": report["num_genuine"]})
    return out


def evaluate_model(backbone, data_root: str, fars=(1e-4, 1e-3, 1e-2)) -> Dict[str, Any]:
    """TAR@FAR (percent) on ``data_root/IJBC`` and the lfw.bin accuracy of ``backbone`` (on the
    device of its parameters, fp32)."""
    from eval.model_io import TorchEmbedder
    from eval.bin_verification import load_bin, verify

    out = ijb_tar_at_far(backbone, os.path.join(data_root, "IJBC"), "IJBC", fars)
    embedder = TorchEmbedder(backbone, autocast=False, description="kd_quality")
    result = verify(load_bin(os.path.join(data_root, "lfw.bin")), embedder)
    out.update({"bin_acc": result.accuracy, "bin_std": result.std})
    return out


def load_trained(network: str, embedding_size: int, output: str, device: str = "cpu"):
    """The backbone a run saved as ``output/model.pt`` (weights_only load), on ``device``."""
    import torch

    from plugins.backbones import get_model

    model = get_model(network, num_features=embedding_size)
    state = torch.load(os.path.join(output, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device)


def _load_student(cfg, device: str = "cpu"):
    return load_trained(cfg.network, cfg.embedding_size, cfg.output, device)


# --------------------------------------------------------------------------- jobs

def train_teacher(job: Mapping[str, Any]) -> Dict[str, Any]:
    """Train the teacher (``distill='none'``), evaluate it, build its embedding cache (unless
    ``job['build_cache']`` is False: a convergence reference); write ``<output>/teacher.json``
    last (the marker of a finished teacher)."""
    device = job.get("device", "cpu")
    pin_process(device=device)
    from engine.teacher_cache_build import build_from_config
    from engine.trainer import train

    cfg = run_config(job)
    start = time.time()
    summary = train(cfg)
    metrics = evaluate_model(_load_student(cfg, device), job["data_root"])
    if job.get("build_cache", True):
        cache_cfg = dict(cfg, teacher_network=cfg.network,
                         teacher_embedding_size=cfg.embedding_size,
                         teacher_checkpoint=os.path.join(cfg.output, "model.pt"),
                         teacher_cache=os.path.join(cfg.output, "embedding_cache"),
                         teacher_fp16=False, num_workers=0, batch_size=128)
        build_from_config(cache_cfg, dtype="float32")
    result = {"name": job["name"], "metrics": metrics, "steps": summary["steps"],
              "epochs": int(cfg.num_epoch), "final_loss": summary["loss"],
              "seconds": round(time.time() - start, 1), "digest": job["digest"]}
    _write_json(os.path.join(cfg.output, "teacher.json"), result)
    return result


def train_and_eval(job: Mapping[str, Any]) -> Dict[str, Any]:
    """One student run; writes ``<output>/result.json`` last and returns it."""
    from tools.kd_bench import cached_result

    done = cached_result(job["output"], "result.json", job["digest"]) \
        if job.get("reuse", True) else None
    if done is not None:          # another benchmark process finished this run meanwhile
        return done
    device = job.get("device", "cpu")
    pin_process(device=device)
    from engine.trainer import train

    cfg = run_config(job)
    start = time.time()
    summary = train(cfg)
    metrics = evaluate_model(_load_student(cfg, device), job["data_root"])
    losses = summary["losses"]
    result = {"name": job["name"], "method": job["method"], "seed": job["seed"],
              "metrics": metrics, "steps": summary["steps"], "final_loss": summary["loss"],
              "mean_loss_last_10pct": sum(losses[-max(1, len(losses) // 10):]) /
              max(1, len(losses[-max(1, len(losses) // 10):])),
              "seconds": round(time.time() - start, 1), "digest": job["digest"]}
    _write_json(os.path.join(cfg.output, "result.json"), result)
    return result
