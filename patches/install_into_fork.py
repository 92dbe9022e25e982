"""Copy the distillation toolkit into a fork's ``recognition/arcface_torch`` folder.

    python patches/install_into_fork.py /path/to/insightface/recognition/arcface_torch --dry-run
    python patches/install_into_fork.py /path/to/insightface/recognition/arcface_torch
    python patches/install_into_fork.py /path/to/.../arcface_torch --plugins-only

Copies ``plugins/``, ``engine/``, ``data/``, ``train_distill.py``, the job configs
``configs/<job>.py``, ``eval/``, ``tools/`` and ``patches/``.  With ``--plugins-only`` (for the
patched ``train_v2.py``, which needs the plugin alone): ``plugins/``, the job configs and
``patches/``.  A file the fork already has is never overwritten: if its content is
ours byte for byte it is reported as already installed, otherwise the copy is refused and
reported.  ``configs/base.py`` is never copied (the fork keeps its own; the plugin supplies the
distillation defaults), nor ``configs/__init__.py`` when the fork has one.

Refusals in ``plugins/``, ``engine/``, ``data/`` or ``train_distill.py`` are essential: the toolkit cannot run
next to a different module of the same name, so nothing at all is written and the exit status
is 1.  Other refusals (e.g. an ``eval/`` file of the fork) leave the fork's file in place; the
rest is copied and the exit status is 0.  An invalid target exits with status 2.

Forks of every age (``detect_vintage``): the report names the fork's vintage -- ``train_v2.py``
(2022-07 ..), ``train.py`` with ``PartialFC(..., opt)`` (2022-01 .. 2022-05), ``train.py`` with
PartialFC v1 ``forward_backward`` and ``configs/`` (2021-07 .. 2021-09) or with ``config.py`` at
the root (2021-03 .. 2021-06) -- and the ways that train there.  train_distill.py reads base keys
an older fork's ``configs/base.py`` lacks (``margin_list``, ``seed``, ``num_workers``,
``gradient_acc``, ...): the install writes them, with our defaults and comments, to a file of ours,
``configs/kdface_base.py``, which train_distill.py's loader merges under the fork's base (the fork's
values win; the fork's own loader never reads it) -- listed in the report, never edited into the
fork's file.  A fork without ``configs/base.py`` (the 2021-03 .. 2021-06 layout) gets ours.
"""
from __future__ import annotations

import argparse
import ast
import filecmp
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ESSENTIAL_DIRS = ("plugins", "engine", "data")
ESSENTIAL_FILES = ("train_distill.py",)
OPTIONAL_DIRS = ("eval", "tools", "patches")
# --plugins-only: what the patched train_v2.py imports, and the patcher
PLUGINS_ONLY_ESSENTIAL_DIRS = ("plugins",)
PLUGINS_ONLY_OPTIONAL_DIRS = ("patches",)
SKIPPED_NAMES = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".orig", ".tmp")
# the base keys of ours that a fork's configs/base.py lacks; engine/config.py merges this file
BASE_SUPPLEMENT = os.path.join("configs", "kdface_base.py")
# keys arcface_torch's job configs set (never defaulted for a fork: each job names its data)
JOB_KEYS = ("rec", "num_classes", "num_image", "num_epoch", "warmup_epoch", "val_targets")


@dataclass(frozen=True)
class Item:
    """One file of the plan: ``rel`` path (same in both trees), ``essential`` and ``status``:
    ``copy`` | ``write`` (a file generated for this fork: ``text``) | ``same`` (already installed,
    identical) | ``refused`` | ``kept`` (fork's own file we deliberately do not ship), with
    ``reason`` for the last three."""
    rel: str
    essential: bool
    status: str
    reason: str = ""
    text: str = ""        # status "write": the content generated for the fork


class NotArcfaceTorch(ValueError):
    """The target folder does not look like an arcface_torch checkout."""


@dataclass(frozen=True)
class Vintage:
    """An arcface_torch layout of upstream's history: ``script`` (the training script),
    ``period``, ``shape`` (what identifies it) and ``patchable`` (patch_train_v2.py fits it)."""
    script: str
    period: str
    shape: str
    patchable: bool

    def routes(self, fork: str) -> str:
        """The ways that train a shipped job in such a fork (printed by the install)."""
        way1 = "train_distill.py (way 1: torchrun --nproc_per_node=8 train_distill.py configs/<job>)"
        if not self.patchable:
            return (f"{way1}; its {self.script} is not patchable (PartialFC v1 loop: "
                    f"forward_backward + a second optimizer)")
        return (f"{way1}, or its own {self.script} patched (way 2: python "
                f"patches/patch_train_v2.py {os.path.join(fork, self.script)})")


def _calls_and_imports(path: str) -> Dict[str, bool]:
    """What identifies a training script's vintage, read from its syntax tree."""
    with open(path, encoding="utf-8") as handle:
        try:
            tree = ast.parse(handle.read(), filename=path)
        except SyntaxError:
            return {}
    names = {getattr(node.func, "attr", getattr(node.func, "id", None))
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return {"forward_backward": "forward_backward" in names,
            "partial_fc": bool({"PartialFC", "PartialFCAdamW"} & names),
            "root_config": "config" in modules}


def detect_vintage(fork: str) -> Optional[Vintage]:
    """The fork's vintage from its training script, or None when it has none we know."""
    if os.path.isfile(os.path.join(fork, "train_v2.py")):
        return Vintage("train_v2.py", "2022-07 .. today", "train_v2.py with PartialFC_V2", True)
    script = os.path.join(fork, "train.py")
    if not os.path.isfile(script):
        return None
    found = _calls_and_imports(script)
    if found.get("forward_backward") or found.get("root_config"):
        if found.get("root_config"):
            return Vintage("train.py", "2021-03 .. 2021-06",
                           "train.py with config.py at the root, PartialFC v1 forward_backward",
                           False)
        return Vintage("train.py", "2021-07 .. 2021-09",
                       "train.py with configs/, PartialFC v1 forward_backward", False)
    if found.get("partial_fc"):
        return Vintage("train.py", "2022-01 .. 2022-05",
                       "train.py with PartialFC(embeddings, labels, optimizer)", True)
    return None


def check_target(fork: str) -> None:
    """Raise NotArcfaceTorch unless ``fork`` has a training script (``train_v2.py`` or
    ``train.py``) or the layout (``backbones/`` with ``configs/`` or a root ``config.py``), and
    is not this toolkit itself."""
    if not os.path.isdir(fork):
        raise NotArcfaceTorch(f"{fork}: not a folder; pass your fork's "
                              f"insightface/recognition/arcface_torch folder")
    if os.path.realpath(fork) == os.path.realpath(REPO_ROOT):
        raise NotArcfaceTorch(f"{fork} is this toolkit itself; pass your fork's folder")
    has_script = any(os.path.isfile(os.path.join(fork, s)) for s in ("train_v2.py", "train.py"))
    has_layout = os.path.isdir(os.path.join(fork, "backbones")) and (
        os.path.isdir(os.path.join(fork, "configs")) or
        os.path.isfile(os.path.join(fork, "config.py")))
    if not (has_script or has_layout):
        raise NotArcfaceTorch(
            f"{fork} does not look like arcface_torch: it has neither train_v2.py / train.py nor "
            f"backbones/ with configs/ (or config.py); pass the "
            f"insightface/recognition/arcface_torch folder of your fork")


def base_keys(path: str) -> Dict[str, str]:
    """``{key: its assignment line}`` of every ``config.<key> = ...`` in a base config file, in
    any branch (2021's base sets keys per dataset under ``if``), read without running it."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    lines = text.splitlines()
    found: Dict[str, str] = {}
    for node in ast.walk(ast.parse(text, filename=path)):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                    target.value.id == "config":
                found.setdefault(target.attr, "\n".join(
                    lines[node.lineno - 1:node.end_lineno]).strip())
    return found


def supplement_text(missing: Dict[str, str]) -> str:
    """``configs/kdface_base.py``: our base lines for the keys the fork's base lacks."""
    return ('"""Written by kdface\'s patches/install_into_fork.py: the keys of kdface\'s '
            'configs/base.py that\nthis fork\'s configs/base.py lacks, with kdface\'s defaults. '
            'train_distill.py (engine/config.py)\nmerges them under the fork\'s base (the fork\'s '
            'values win); the fork\'s own scripts never read\nthis file.  Edit a value here to '
            'change it for every job; re-running the install keeps an\nedited file.\n"""\n'
            "from easydict import EasyDict as edict\n\nconfig = edict()\n"
            + "".join(line + "\n" for line in missing.values()))


def _base_plan(fork: str) -> List["Item"]:
    """Our ``configs/base.py`` for a fork without one; else ``configs/kdface_base.py`` with the
    keys of ours its base lacks (nothing when it lacks none)."""
    base = os.path.join("configs", "base.py")
    if not os.path.isfile(os.path.join(fork, base)):
        return [_classify(fork, base, False)]
    ours = base_keys(os.path.join(REPO_ROOT, base))
    theirs = base_keys(os.path.join(fork, base))
    missing = {key: line for key, line in ours.items()
               if key not in theirs and key not in JOB_KEYS}
    if not missing:
        return []
    text = supplement_text(missing)
    target = os.path.join(fork, BASE_SUPPLEMENT)
    if not os.path.lexists(target):
        return [Item(BASE_SUPPLEMENT, False, "write", ", ".join(missing), text)]
    with open(target, encoding="utf-8") as handle:
        same = handle.read() == text
    return [Item(BASE_SUPPLEMENT, False, "same" if same else "refused",
                 "" if same else "the fork has its own (edited?) file; keys its base lacks: "
                 + ", ".join(missing))]


def _tree_files(folder: str) -> List[str]:
    """Files below ``REPO_ROOT/folder`` as repo-relative paths, sorted, caches skipped."""
    found = []
    for root, dirs, files in os.walk(os.path.join(REPO_ROOT, folder)):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_NAMES)
        for name in sorted(files):
            if not name.endswith(SKIPPED_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), REPO_ROOT))
    return found


def _job_configs() -> List[str]:
    folder = os.path.join(REPO_ROOT, "configs")
    return sorted(os.path.join("configs", n) for n in os.listdir(folder)
                  if n.endswith(".py") and n not in ("base.py", "__init__.py"))


def _classify(fork: str, rel: str, essential: bool) -> Item:
    target = os.path.join(fork, rel)
    if not os.path.lexists(target):
        # a file where we need a folder, e.g. the fork's own file engine for engine/x.py
        parent = os.path.dirname(rel)
        while parent:
            if os.path.lexists(os.path.join(fork, parent)) and \
                    not os.path.isdir(os.path.join(fork, parent)):
                return Item(rel, essential, "refused", f"the fork has a file {parent}")
            parent = os.path.dirname(parent)
        return Item(rel, essential, "copy")
    if os.path.isfile(target) and filecmp.cmp(os.path.join(REPO_ROOT, rel), target,
                                              shallow=False):
        return Item(rel, essential, "same")
    return Item(rel, essential, "refused", "the fork has its own file of that name")


def plan(fork: str, plugins_only: bool = False) -> List[Item]:
    """What installing into ``fork`` would do, file by file (nothing is written);
    ``plugins_only``: only what a patched train_v2.py needs (plugins/, job configs, patches/)."""
    check_target(fork)
    essential_dirs = PLUGINS_ONLY_ESSENTIAL_DIRS if plugins_only else ESSENTIAL_DIRS
    optional_dirs = PLUGINS_ONLY_OPTIONAL_DIRS if plugins_only else OPTIONAL_DIRS
    items = []
    for name in essential_dirs + optional_dirs:
        essential = name in essential_dirs
        shadow = os.path.join(fork, name + ".py")
        if os.path.exists(shadow):  # `import engine` would be ambiguous
            items.append(Item(name + ".py", essential, "refused",
                              f"the fork's module {name}.py has the name of our package {name}/"))
        items += [_classify(fork, rel, essential) for rel in _tree_files(name)]
    if not plugins_only:
        items += [_classify(fork, rel, True) for rel in ESSENTIAL_FILES]
    items += [_classify(fork, rel, False) for rel in _job_configs()]
    init = os.path.join("configs", "__init__.py")
    if os.path.exists(os.path.join(fork, init)):
        items.append(Item(init, False, "kept", "the fork's own package file"))
    elif os.path.isfile(os.path.join(REPO_ROOT, init)):
        items.append(_classify(fork, init, False))
    if not plugins_only:       # train_distill.py's loader reads them; the patched loop does not
        items += _base_plan(fork)
    return items


def _copy(rel: str, fork: str, text: Optional[str] = None) -> None:
    """Copy one file (or write ``text``) atomically (temporary name in the target folder, then
    rename)."""
    target = os.path.join(fork, rel)
    os.makedirs(os.path.dirname(target) or fork, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".kdface_", suffix=".tmp",
                                   dir=os.path.dirname(target) or fork)
    os.close(handle)
    try:
        if text is None:
            shutil.copy2(os.path.join(REPO_ROOT, rel), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def install(fork: str, dry_run: bool = False, out=None, plugins_only: bool = False) -> int:
    """Install into ``fork`` and print the report to ``out``; returns the exit status
    (0 done, 1 an essential file was refused and nothing was written)."""
    out = out or sys.stdout
    items = plan(fork, plugins_only)
    essential_dirs = PLUGINS_ONLY_ESSENTIAL_DIRS if plugins_only else ESSENTIAL_DIRS
    essential_refused = [i for i in items if i.status == "refused" and i.essential]
    write = not dry_run and not essential_refused
    verb = "copied" if write else "would copy"
    print(f"kdface install into {os.path.abspath(fork)}" + (" (dry run)" if dry_run else ""),
          file=out)
    vintage = detect_vintage(fork)
    if vintage is None:
        print("fork: no train_v2.py / train.py recognised; train with train_distill.py (way 1)",
              file=out)
    else:
        print(f"fork: {vintage.shape} (arcface_torch {vintage.period}); trains with "
              f"{vintage.routes(fork)}", file=out)
    for item in items:
        if item.status in ("copy", "write"):
            if write:
                _copy(item.rel, fork, item.text if item.status == "write" else None)
            what = (f" (base keys of ours the fork's configs/base.py lacks: {item.reason}; "
                    f"train_distill.py merges them under it, the fork's values win)"
                    if item.status == "write" else "")
            print(f"  {verb:<10} {item.rel}{what}", file=out)
        elif item.status == "same":
            print(f"  {'same':<10} {item.rel} (already installed, identical)", file=out)
        elif item.status == "kept":
            print(f"  {'kept':<10} {item.rel} ({item.reason})", file=out)
        else:
            tag = "REFUSED" if item.essential else "refused"
            print(f"  {tag:<10} {item.rel}: {item.reason}; not overwritten", file=out)
    counts = {s: sum(i.status == s for i in items) for s in ("copy", "write", "same", "refused")}
    print(f"{counts['copy'] + counts['write']} {verb}, {counts['same']} already installed, "
          f"{counts['refused']} refused", file=out)
    if essential_refused:
        names = ", ".join(i.rel for i in essential_refused[:5])
        more = f" and {len(essential_refused) - 5} more" if len(essential_refused) > 5 else ""
        print(f"error: {len(essential_refused)} essential file(s) refused ({names}{more}): the "
              f"fork already has different files where "
              f"{', '.join(d + '/' for d in essential_dirs)}"
              f"{'' if plugins_only else ' or train_distill.py'} go. "
              f"Nothing was written. If they are left from an older install, delete them "
              f"(e.g. rm -r {' '.join(os.path.join(fork, d) for d in essential_dirs)}) and "
              f"run again; if they are the fork's own modules, rename them in the fork.",
              file=out)
        return 1
    refused = [i.rel for i in items if i.status == "refused"]
    if refused:
        print(f"note: kept the fork's own {', '.join(refused)}; ours are in {REPO_ROOT} if you "
              f"need them", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Copy kdface (plugins/, engine/, data/, train_distill.py, job configs, eval/, "
                    "tools/, patches/) into a fork's arcface_torch folder without overwriting "
                    "anything")
    parser.add_argument("fork", help="the fork's insightface/recognition/arcface_torch folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--plugins-only", action="store_true",
                        help="only plugins/, the job configs and patches/: enough for the "
                             "patched train_v2.py (patches/patch_train_v2.py)")
    args = parser.parse_args(argv)
    try:
        return install(args.fork, dry_run=args.dry_run, plugins_only=args.plugins_only)
    except NotArcfaceTorch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
