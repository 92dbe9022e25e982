"""Distillation training entry point, arcface_torch style.

    torchrun --nproc_per_node=8 train_distill.py configs/ms1mv2_mbf_adadistill
    python train_distill.py configs/ms1mv2_mbf_adadistill            # one process (CPU or 1 GPU)
    python train_distill.py configs/<name> --resume                  # newest valid checkpoint
    python train_distill.py configs/<name> --start-over              # delete old checkpoints
    torchrun --nproc_per_node=8 train_distill.py configs/<name> --build-teacher-cache
"""
import argparse
import signal

import torch.distributed as dist

from engine.config import get_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Knowledge distillation for face recognition")
    parser.add_argument("config", help="configs/<name> (with or without .py)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--start-over", action="store_true",
                        help="delete the checkpoints of an earlier run in the output folder and "
                             "train from scratch (without it, a fresh run there refuses)")
    parser.add_argument("--build-teacher-cache", action="store_true",
                        help="embed every training image and its mirror with the teacher into "
                             "cfg.teacher_cache, then exit")
    args = parser.parse_args(argv)
    cfg = get_config(args.config)
    cfg.resume = cfg.resume or args.resume
    cfg.start_over = cfg.get("start_over", False) or args.start_over
    if cfg.resume and cfg.start_over:
        parser.error("--resume and --start-over contradict each other")
    try:
        if args.build_teacher_cache:
            from engine.teacher_cache_build import build_from_config
            build_from_config(cfg)
        else:
            from engine.trainer import train
            stopped_by = train(cfg).get("stopped_by")
            if stopped_by:                  # saved and resumable; the run did not finish
                raise SystemExit(128 + int(signal.Signals[stopped_by]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
