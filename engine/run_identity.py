"""What run a checkpoint belongs to, and whether a config may resume it.

Every checkpoint's ``common.pt`` records the run: the config name, the values of the keys that
shape the saved state (``STATE_KEYS``: the method, the networks, the embedding sizes, the class
count, the optimizer, the training set's fingerprint), their sha256 digest, and every other config
value.  ``check_resume`` refuses a checkpoint whose state-shaping keys differ -- naming them,
before any ``load_state_dict`` can fail on a shape -- and logs every other changed key (lr,
schedule, max_steps, seed, ...) one line each: those changes are allowed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional

LOG = logging.getLogger("train_distill")

STATE_KEYS = ("distill", "network", "embedding_size", "teacher_network",
              "teacher_embedding_size", "num_classes", "optimizer", "dataset")
# keys that describe how this process was started, not the run
_IGNORED = ("resume", "start_over", "config_name")


def _plain(value: Any) -> Any:
    """A JSON- and ``weights_only``-safe copy (tuples become lists, other objects their repr)."""
    return json.loads(json.dumps(value, default=repr))


def dataset_identity(cfg: Mapping[str, Any], num_images: int) -> str:
    """The training set's fingerprint (sha256 of its .idx and size of its .rec, independent of
    where it lives) plus its image count; its path and count when it has no .idx."""
    from plugins.teacher_cache import dataset_fingerprint
    try:
        return f"{dataset_fingerprint(cfg['rec'])};images:{num_images}"
    except (FileNotFoundError, OSError):
        return f"path:{os.path.abspath(cfg['rec'])};images:{num_images}"


def run_identity(cfg: Mapping[str, Any], num_images: int) -> Dict[str, Any]:
    """The record stored as ``common["run"]`` in every checkpoint of this run."""
    state = {key: _plain(cfg.get(key)) for key in STATE_KEYS if key != "dataset"}
    state["dataset"] = dataset_identity(cfg, num_images)
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    config = {key: _plain(cfg[key]) for key in sorted(cfg) if key not in _IGNORED}
    return {"config_name": str(cfg.get("config_name", "")), "digest": digest, "state": state,
            "config": config}


def state_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """``"key: saved -> current"`` for each state-shaping key that differs."""
    old, new = saved.get("state", {}), current["state"]
    return [f"'{key}': {old.get(key)!r} -> {new.get(key)!r}" for key in STATE_KEYS
            if old.get(key) != new.get(key)]


def check_resume(path: str, saved: Optional[Mapping[str, Any]],
                 current: Mapping[str, Any]) -> None:
    """Refuse to resume checkpoint ``path`` (run record ``saved``) with the run ``current``
    when a state-shaping key differs; log each other changed key.

    Raises:
        ValueError: naming every differing state-shaping key with both values.
    """
    if not isinstance(saved, Mapping) or "state" not in saved:
        LOG.warning("resume: %s records no run identity (written before run identities were "
                    "kept); not checked against this config", path)
        return
    differing = state_differences(saved, current)
    if differing:
        raise ValueError(
            f"resume: {path} belongs to another run (config '{saved.get('config_name', '')}'): "
            f"the state-shaping config key(s) differ: {'; '.join(differing)}. Resume it with "
            f"its own config, or set another config.output for this one (or --start-over to "
            f"discard those checkpoints)")
    old, new = saved.get("config", {}), current["config"]
    for key in sorted(set(old) | set(new)):
        if key in STATE_KEYS or old.get(key) == new.get(key):
            continue
        LOG.info("resume with a changed config key '%s': %r -> %r", key,
                 old.get(key, "<unset>"), new.get(key, "<unset>"))
