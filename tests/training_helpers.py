"""Shared pieces of the training tests: a tiny job config writer and a trained demo teacher."""
import os
import shutil

from engine.config import get_config
from tools.synthetic import write_train_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDS, PER_ID = 16, 8


def make_workdir(root):
    """Synthetic data and a teacher trained briefly with the standalone head (its model.pt and
    learned classifier.pt are what the distillation runs load)."""
    from engine.trainer import train
    write_train_set(str(root / "data"), NUM_IDS, PER_ID, seed=3)
    (root / "configs").mkdir()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), root / "configs" / "base.py")
    teacher = job_config(root, "teacher", distill="none", network="tiny_t", max_steps=30,
                         lr=0.1, batch_size=16, num_epoch=100)
    summary = train(teacher)
    assert summary["losses"][-1] < summary["losses"][0]
    for name in ("model.pt", "classifier.pt"):
        shutil.copy(os.path.join(teacher.output, name),
                    root / ("teacher.pt" if name == "model.pt" else name))
    return root


def job_config(root, name, **overrides):
    """A tiny job config file in root/configs, loaded with the real loader."""
    values = dict(network="tiny_s", teacher_network="tiny_t",
                  teacher_checkpoint=str(root / "teacher.pt"),
                  teacher_classifier=str(root / "classifier.pt"),
                  margin_list=(1.0, 0.0, 0.35), margin_scale=16.0, rec=str(root / "data"),
                  num_classes=NUM_IDS, num_image=NUM_IDS * PER_ID, num_epoch=3, batch_size=8,
                  lr=0.05, lr_schedule="step", lr_steps=(), num_workers=0, val_targets=[],
                  frequent=100, save_every=1000, seed=5, output=str(root / "runs" / name),
                  gkd_k=4, gkd_warmup_epochs=0)
    values.update(overrides)
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{k} = {v!r}" for k, v in values.items()]
    (root / "configs" / f"{name}.py").write_text("\n".join(lines) + "\n")
    return get_config(f"configs/{name}", root=str(root))


def train_capturing_head(cfg):
    """``(summary, head, initial_state)``: ``engine.trainer.train(cfg)`` with the head it builds
    caught on the way (``initial_state``: a copy of the head's state right after it was built)."""
    import engine.trainer as trainer

    made, initial = [], {}
    real_build = trainer.build_head

    def spy(*args, **kwargs):
        made.append(real_build(*args, **kwargs))
        initial.update({k: v.detach().clone() for k, v in made[-1].state_dict().items()})
        return made[-1]
    trainer.build_head = spy
    try:
        summary = trainer.train(cfg)
    finally:
        trainer.build_head = real_build
    return summary, made[0], initial
