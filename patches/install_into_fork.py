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
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ESSENTIAL_DIRS = ("plugins", "engine", "data")
ESSENTIAL_FILES = ("train_distill.py",)
OPTIONAL_DIRS = ("eval", "tools", "patches")
# --plugins-only: what the patched train_v2.py imports, and the patcher
PLUGINS_ONLY_ESSENTIAL_DIRS = ("plugins",)
PLUGINS_ONLY_OPTIONAL_DIRS = ("patches",)
SKIPPED_NAMES = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".orig", ".tmp")


@dataclass(frozen=True)
class Item:
    """One file of the plan: ``rel`` path (same in both trees), ``essential`` and ``status``:
    ``copy`` | ``same`` (already installed, identical) | ``refused`` | ``kept`` (fork's own file
    we deliberately do not ship), with ``reason`` for the last two."""
    rel: str
    essential: bool
    status: str
    reason: str = ""


class NotArcfaceTorch(ValueError):
    """The target folder does not look like an arcface_torch checkout."""


def check_target(fork: str) -> None:
    """Raise NotArcfaceTorch unless ``fork`` has ``train_v2.py`` or both ``configs/`` and
    ``backbones/`` (and is not this toolkit itself)."""
    if not os.path.isdir(fork):
        raise NotArcfaceTorch(f"{fork}: not a folder; pass your fork's "
                              f"insightface/recognition/arcface_torch folder")
    if os.path.realpath(fork) == os.path.realpath(REPO_ROOT):
        raise NotArcfaceTorch(f"{fork} is this toolkit itself; pass your fork's folder")
    has_script = os.path.isfile(os.path.join(fork, "train_v2.py"))
    has_layout = all(os.path.isdir(os.path.join(fork, d)) for d in ("configs", "backbones"))
    if not (has_script or has_layout):
        raise NotArcfaceTorch(
            f"{fork} does not look like arcface_torch: it has neither train_v2.py nor both "
            f"configs/ and backbones/; pass the insightface/recognition/arcface_torch folder of "
            f"your fork")


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
    return items


def _copy(rel: str, fork: str) -> None:
    """Copy one file atomically (temporary name in the target folder, then rename)."""
    target = os.path.join(fork, rel)
    os.makedirs(os.path.dirname(target) or fork, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".kdface_", suffix=".tmp",
                                   dir=os.path.dirname(target) or fork)
    os.close(handle)
    try:
        shutil.copy2(os.path.join(REPO_ROOT, rel), tmp)
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
    for item in items:
        if item.status == "copy":
            if write:
                _copy(item.rel, fork)
            print(f"  {verb:<10} {item.rel}", file=out)
        elif item.status == "same":
            print(f"  {'same':<10} {item.rel} (already installed, identical)", file=out)
        elif item.status == "kept":
            print(f"  {'kept':<10} {item.rel} ({item.reason})", file=out)
        else:
            tag = "REFUSED" if item.essential else "refused"
            print(f"  {tag:<10} {item.rel}: {item.reason}; not overwritten", file=out)
    counts = {s: sum(i.status == s for i in items) for s in ("copy", "same", "refused")}
    print(f"{counts['copy']} {verb}, {counts['same']} already installed, "
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
