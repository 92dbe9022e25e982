"""Patch a fork's own arcface_torch ``train_v2.py`` so that it trains with the distillation plugin.

    python patches/patch_train_v2.py path/to/train_v2.py              # patch (keeps .orig)
    python patches/patch_train_v2.py path/to/train_v2.py --dry-run    # print the diff only
    python patches/patch_train_v2.py path/to/train_v2.py --revert     # remove the patch

Every ``train_v2.py`` of upstream's history (2022-07 .. today) has the shape patched here, and so
has the ``train.py`` of 2022-01 .. 2022-05 (``PartialFC(...)`` whose call also takes the
optimizer): pass that file instead.  The ``train.py`` of 2021-03 .. 2021-09 (PartialFC v1:
``forward_backward`` hands the class shard's gradient to ``features.backward``, a second optimizer
steps the shard) is refused by name, with the way that works there (``train_distill.py``).

The places to change are found by their meaning in the Python syntax tree, never by line number,
so a fork that moved, renamed or reformatted things is still patched correctly:

- imports: after the last module-level import before the first ``def``/``class``, import the
  patched loop's helpers (``plugins/fork_loop.py``, ``fork_recipe.py``, ``fork_data.py``);
- config: after ``<cfg> = get_config(...)``: ``prepare_fork_config(<cfg>)`` -- a job that sets
  no ``distill`` key is one of the fork's own and is left untouched (it trains, and dumps its
  config, exactly as before); for ours: distillation defaults, start-up checks, a warning per key
  the fork's loop does not honour (those keys leave the config, as do recipe keys the job does
  not set);
- loader: the ``<loader> = ...`` the training loop iterates becomes ``keyed_loader(<cfg>, ...)``
  (our jobs: the same loader yielding ``(img, label, index, flipped)``, flips from
  ``(seed, epoch)``), and the loop's ``(img, labels)`` target gets ``*sample_keys``;
- backbone: ``<net> = ...get_model(...)...`` calls ``model_builder(<cfg>, get_model)(...)``
  instead: the fork's ``get_model`` for its own jobs, ``plugins.backbones.resolve_model`` (the
  fork's names first, then the bundled ones) for ours;
- head: every ``<head> = PartialFC_V2(...)`` (or 2022's ``PartialFC`` / ``PartialFCAdamW``;
  possibly chained, e.g. ``.cuda()``) becomes ``build_fork_head(<cfg>) if distill_method(<cfg>)
  != "none" else PartialFC_V2(...)``; the fork's own device move then applies to whichever
  module was built;
- scheduler: ``<sched> = <...Scheduler / ...LR / ...Warmup>(<opt>, ...)`` becomes
  ``recipe_scheduler(<cfg>, <opt>, <loader>) or <the fork's construction>``: the job's
  momentum / Nesterov on the fork's SGD, and the job's lr schedule (train_distill.py's, for the
  same global batch) when it sets one, else the fork's scheduler;
- clip: every ``clip_grad_norm_(...)`` in the training loop calls ``grad_clipper(<cfg>,
  clip_grad_norm_)(...)``: the job's ``grad_clip`` (0: none) when it sets one, else the fork's;
- teacher: just before the outermost loop around the loss call (the training loop), once,
  ``teacher = build_fork_teacher(<cfg>, <net>, <loader>)`` (the frozen teacher on the backbone's
  device, or the teacher-embedding cache);
- loss: the single ``<loss> = <head>(<emb>, <labels>)`` (2022: ``<head>(<emb>, <labels>,
  <opt>)``) inside that loop, after ``<emb> = <net>(<img>)`` and inside ``for <epoch> in
  range(...)``, becomes ``fork_head_loss(<head>, <cfg>, <net>, teacher, <img>, <emb>, <labels>,
  <epoch>, sample_keys)``: the fork's own call for ``distill = "none"``; else the plugin's head
  with the embeddings' gradient scaled by the DDP world size, as upstream's PartialFC_V2 does, so
  that the fork's DDP average gives the gradient of the global-batch mean loss on any GPU count.

Every change sits between ``# >>> kdface distill`` and ``# <<< kdface distill``; a replaced
statement (or loop header) is kept inside its block as ``#|`` comment lines, so ``--revert``
restores the file exactly and patching twice gives the same file.  If an anchor is missing,
nothing is written and the message names the anchor, the pattern searched and what to add by
hand.  The file is written atomically (temporary file + rename) after the original is saved as
``<file>.orig``.

This module uses the standard library only: it runs before the fork can import the plugin.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

BEGIN = "# >>> kdface distill"
END = "# <<< kdface distill"
KEPT = "#|"
REPLACED_NOTE = ": replaces the statement kept below as #| comments"
# a kept line: its indentation, then "#|" (or "# |", what code formatters make of it)
_KEPT_LINE = re.compile(r"^([ \t]*)# ?\|(.*)$")

IMPORT_LINES = (
    "from plugins.fork_data import keyed_loader",
    "from plugins.fork_loop import (build_fork_head, build_fork_teacher, distill_method,",
    "                               fork_head_loss, model_builder, prepare_fork_config)",
    "from plugins.fork_recipe import grad_clipper, recipe_scheduler",
)
# Names the patch introduces; a fork that already binds one of them would be silently shadowed.
INTRODUCED_NAMES = ("teacher", "sample_keys", "keyed_loader", "build_fork_head",
                    "build_fork_teacher", "distill_method", "fork_head_loss", "model_builder",
                    "prepare_fork_config", "grad_clipper", "recipe_scheduler")
# the Partial FC classes whose construction the head anchor replaces: upstream's train_v2.py
# (2022-07 ..) and the train.py of 2022-01 .. 2022-05 (SGD / AdamW variants)
HEAD_CLASSES = ("PartialFC_V2", "PartialFC", "PartialFCAdamW")
# a scheduler class by its name: PolyScheduler, PolynomialLRWarmup, LambdaLR, StepLR, ...
_SCHEDULER_NAME = re.compile(r"(Scheduler|LR|Warmup)$")


@dataclass(frozen=True)
class Anchor:
    """What the patcher looks for: its meaning, the pattern searched, what to add by hand."""
    meaning: str
    pattern: str
    by_hand: str


ANCHORS: Dict[str, Anchor] = {
    "imports": Anchor(
        "the module-level imports at the top of the script",
        "an `import ...` / `from ... import ...` statement in the module body before the first "
        "`def` or `class`",
        "at the top of the file:\n    " + "\n    ".join(IMPORT_LINES)),
    "config": Anchor(
        "the line that loads the config",
        "an assignment `<cfg> = get_config(...)` (also `<module>.get_config(...)`)",
        "right after the config is loaded:\n"
        "    prepare_fork_config(cfg)"),
    "head": Anchor(
        "the construction of the Partial FC loss module",
        "an assignment `<head> = PartialFC_V2(...)` (2022-01 .. 2022-05: `PartialFC(...)` / "
        "`PartialFCAdamW(...)`; the call may be chained, e.g. `PartialFC_V2(...).cuda()`)",
        "replace the construction by\n"
        "    module_partial_fc = build_fork_head(cfg) if distill_method(cfg) != \"none\" else "
        "PartialFC_V2(...)\n"
        "  and move it to the GPU as the fork does (e.g. module_partial_fc.train().cuda())"),
    "backbone": Anchor(
        "the construction of the student backbone",
        "an assignment `<net> = get_model(...)` (also chained, e.g. `get_model(...).cuda()`) "
        "before the training loop",
        "call the builder through the plugin, and before the training loop, once:\n"
        "    backbone = model_builder(cfg, get_model)(cfg.network, ...)\n"
        "    teacher = build_fork_teacher(cfg, backbone, train_loader)"),
    "loader": Anchor(
        "the training data loader and the loop over its batches",
        "a loop `for ... in enumerate(<loader>):` (or `in <loader>:`) around the loss call whose "
        "target unpacks the images and labels as a tuple of names on its one header line, e.g. "
        "`for _, (img, local_labels) in enumerate(train_loader):`, and an assignment "
        "`<loader> = ...` before the training loop",
        "wrap the loader and unpack the sample keys:\n"
        "    train_loader = keyed_loader(cfg, get_dataloader(...))\n"
        "    for _, (img, local_labels, *sample_keys) in enumerate(train_loader):"),
    "scheduler": Anchor(
        "the construction of the learning-rate scheduler",
        "an assignment `<sched> = <name ending in Scheduler, LR or Warmup>(...)` before the "
        "training loop whose `optimizer=` keyword (or first argument) is the optimizer variable",
        "build the scheduler through the plugin (the job's schedule, or the fork's):\n"
        "    lr_scheduler = recipe_scheduler(cfg, opt, train_loader) or PolyScheduler(...)"),
    "clip": Anchor(
        "the gradient clipping in the training loop",
        "a call `clip_grad_norm_(...)` (e.g. `torch.nn.utils.clip_grad_norm_(backbone."
        "parameters(), 5)`) inside the training loop",
        "clip through the plugin, before every optimizer step (as upstream since 2022-01-17):\n"
        "    grad_clipper(cfg, torch.nn.utils.clip_grad_norm_)(backbone.parameters(), 5)"),
    "loss": Anchor(
        "the loss call inside the loader loop",
        "exactly one assignment `<loss> = <head>(<embeddings>, <labels>)` (2022-01 .. 2022-05: "
        "`<head>(<embeddings>, <labels>, <optimizer>)`) where <head> is the Partial FC "
        "variable, inside `for ... in ...:` loops, with `<embeddings> = <backbone>(<img>)` "
        "before it and an enclosing `for <epoch> in range(...):`",
        "in the loop, replacing the loss call:\n"
        "    loss = fork_head_loss(module_partial_fc, cfg, backbone, teacher, img, "
        "local_embeddings, local_labels, epoch, sample_keys)"),
}

# The training scripts upstream's history holds that the patch does not fit: (evidence in the
# syntax tree, the vintage it identifies).  Both train with train_distill.py (way 1).
OLD_LOOPS = (
    ("config", "arcface_torch train.py of 2021-03 .. 2021-06 (config.py at the root, "
               "`from config import config`, PartialFC v1 with `forward_backward`)"),
    ("forward_backward", "arcface_torch train.py of 2021-07 .. 2021-09 (configs/ and "
                         "get_config, PartialFC v1 with `forward_backward`)"),
)


class VintageNotPatchable(ValueError):
    """The script is a training loop of an arcface_torch vintage the patch does not fit."""

    def __init__(self, filename: str, vintage: str, line: int) -> None:
        super().__init__(
            f"{filename}: cannot patch: this is the {vintage} (line {line}). Its loop hands the "
            f"Partial FC gradient to `features.backward(x_grad)` and steps the class shard with "
            f"a second optimizer, a shape the plugin's heads do not fit. Train with "
            f"train_distill.py instead, which runs in forks of every age:\n"
            f"    python patches/install_into_fork.py /path/to/arcface_torch\n"
            f"    torchrun --nproc_per_node=8 train_distill.py configs/ms1mv2_mbf_adadistill\n"
            f"(patches/README.md, 'Forks of every age'). Nothing was written.")


class AnchorNotFound(ValueError):
    """An anchor of the patch is missing or ambiguous: the fork diverged; nothing is written."""

    def __init__(self, filename: str, key: str, detail: str = "") -> None:
        anchor = ANCHORS[key]
        self.key = key
        super().__init__(
            f"{filename}: cannot patch: anchor '{key}' not found -- {anchor.meaning}"
            f"{' (' + detail + ')' if detail else ''}.\n"
            f"  searched for: {anchor.pattern}\n"
            f"  add by hand {anchor.by_hand}\n"
            f"Nothing was written.")


class MarkerError(ValueError):
    """The ``# >>> kdface distill`` blocks of a file are unbalanced or nested."""


@dataclass
class _Edit:
    """Replace lines ``[start, stop)`` (0-based) by a marked block; ``start == stop`` inserts.
    ``new_lines`` are relative to ``indent`` (the block's indentation)."""
    start: int
    stop: int
    indent: str
    new_lines: List[str]


# ----------------------------------------------------------------------------- source helpers

def _call_name(node: ast.AST) -> Optional[str]:
    """``f`` for ``f(...)`` and ``m.f(...)``; None for anything else."""
    if not isinstance(node, ast.Call):
        return None
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _find_call(expr: ast.AST, name: str) -> Optional[ast.Call]:
    """The first call of ``name`` met breadth-first in ``expr`` (``expr`` itself, or the call
    a chain such as ``PartialFC_V2(...).train().cuda()`` starts from)."""
    for node in ast.walk(expr):
        if _call_name(node) == name:
            return node
    return None


def _assigned(stmt: ast.stmt) -> Optional[Tuple[str, ast.expr]]:
    """``(target name, value)`` of ``x = v`` / ``x: T = v`` with a single plain name target."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and \
            isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id, stmt.value
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
            stmt.value is not None:
        return stmt.target.id, stmt.value
    return None


class _Source:
    """The lines of a file with helpers to turn AST positions into text positions."""

    def __init__(self, text: str, filename: str) -> None:
        self.text, self.filename = text, filename
        self.lines = text.splitlines(keepends=True)
        first = self.lines[0] if self.lines else "\n"
        self.newline = "\r\n" if first.endswith("\r\n") else "\n"
        try:
            self.tree = ast.parse(text, filename=filename)
        except SyntaxError as error:
            raise ValueError(f"{filename}: not valid Python ({error.msg} at line {error.lineno}); "
                             f"fix it before patching") from error
        self.parents: Dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node

    def line(self, lineno: int) -> str:
        """Line ``lineno`` (1-based) without its line ending."""
        return self.lines[lineno - 1].rstrip("\r\n")

    def col(self, lineno: int, byte_col: int) -> int:
        """Character column of the UTF-8 byte offset ``byte_col`` (what ast reports)."""
        return len(self.line(lineno).encode("utf-8")[:byte_col].decode("utf-8"))

    def indent(self, node: ast.AST) -> str:
        text = self.line(node.lineno)
        return text[:len(text) - len(text.lstrip())]

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node)

    def statements(self) -> List[ast.stmt]:
        """Every statement of the file, in source order."""
        found = [n for n in ast.walk(self.tree) if isinstance(n, ast.stmt)]
        return sorted(found, key=lambda n: (n.lineno, n.col_offset))

    def ancestors(self, node: ast.AST) -> List[ast.AST]:
        """Parents of ``node``, innermost first."""
        chain = []
        while node in self.parents:
            node = self.parents[node]
            chain.append(node)
        return chain

    def stored_names(self) -> set:
        return {n.id for n in ast.walk(self.tree)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


# ----------------------------------------------------------------------------- anchors

def _statement_edit(src: _Source, stmt: ast.stmt,
                    insertions: Sequence[Tuple[int, int, str]]) -> _Edit:
    """Replace ``stmt`` by its own text with ``insertions`` ``(lineno, char column, text)``
    applied.  Continuation lines inside parentheses may sit left of the statement; their
    indentation is free, so re-indenting them is harmless (the #| copy keeps the original)."""
    new = [src.line(n) for n in range(stmt.lineno, stmt.end_lineno + 1)]
    for lineno, col, text in sorted(insertions, reverse=True):
        i = lineno - stmt.lineno
        new[i] = new[i][:col] + text + new[i][col:]
    indent = src.indent(stmt)
    return _Edit(stmt.lineno - 1, stmt.end_lineno, indent,
                 [line[len(indent):] if line.startswith(indent) else line.lstrip()
                  for line in new])


def _start(src: _Source, node: ast.AST) -> Tuple[int, int]:
    return node.lineno, src.col(node.lineno, node.col_offset)


def _end(src: _Source, node: ast.AST) -> Tuple[int, int]:
    return node.end_lineno, src.col(node.end_lineno, node.end_col_offset)


def _wrap(src: _Source, node: ast.AST, before: str, after: str) -> List[Tuple[int, int, str]]:
    """Insertions that put ``before`` / ``after`` around the text of ``node``."""
    return [(*_start(src, node), before), (*_end(src, node), after)]


def _refuse_old_loops(src: _Source) -> None:
    """Raise VintageNotPatchable for a PartialFC v1 training script (2021-03 .. 2021-09)."""
    for node in ast.walk(src.tree):
        if isinstance(node, ast.ImportFrom) and node.module == "config":
            raise VintageNotPatchable(src.filename, OLD_LOOPS[0][1], node.lineno)
    for node in ast.walk(src.tree):
        if _call_name(node) == "forward_backward":
            raise VintageNotPatchable(src.filename, OLD_LOOPS[1][1], node.lineno)


def _imports_edit(src: _Source) -> _Edit:
    last = None
    for stmt in src.tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            break
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            last = stmt
    if last is None:
        raise AnchorNotFound(src.filename, "imports")
    return _Edit(last.end_lineno, last.end_lineno, "", list(IMPORT_LINES))


def _config_anchor(src: _Source) -> Tuple[ast.stmt, str]:
    for stmt in src.statements():
        assigned = _assigned(stmt)
        if assigned and _call_name(assigned[1]) == "get_config":
            return stmt, assigned[0]
    raise AnchorNotFound(src.filename, "config")


def _config_edit(stmt: ast.stmt, cfg: str, src: _Source) -> _Edit:
    lines = [f"prepare_fork_config({cfg})  # checks our jobs; the fork's own stay untouched"]
    return _Edit(stmt.end_lineno, stmt.end_lineno, src.indent(stmt), lines)


def _head_edits(src: _Source, cfg: str) -> Tuple[List[_Edit], List[str], List[ast.stmt]]:
    edits, names, stmts = [], [], []
    for stmt in src.statements():
        assigned = _assigned(stmt)
        call = None
        for name in HEAD_CLASSES if assigned else ():
            call = call or _find_call(assigned[1], name)
        if call is None:
            continue
        choice = f"build_fork_head({cfg}) if distill_method({cfg}) != \"none\" else "
        if call is not assigned[1]:   # (build_fork_head(cfg) if ... else PartialFC_V2(...)).cuda()
            insertions = _wrap(src, call, "(" + choice, ")")
        else:
            insertions = [(*_start(src, call), choice)]
        edits.append(_statement_edit(src, stmt, insertions))
        names.append(assigned[0])
        stmts.append(stmt)
    if not edits:
        raise AnchorNotFound(src.filename, "head")
    return edits, names, stmts


def _backbone_anchor(src: _Source, before_line: int) -> Tuple[str, ast.stmt, ast.Call]:
    for stmt in src.statements():
        assigned = _assigned(stmt)
        call = _find_call(assigned[1], "get_model") if assigned else None
        if call is not None and stmt.lineno < before_line:
            return assigned[0], stmt, call
    raise AnchorNotFound(src.filename, "backbone")


def _backbone_edit(src: _Source, stmt: ast.stmt, call: ast.Call, cfg: str) -> _Edit:
    """``get_model(...)`` -> ``model_builder(cfg, get_model)(...)`` (same arguments, same
    chaining): the fork's own builder for its jobs, our resolver for ours."""
    return _statement_edit(src, stmt, _wrap(src, call.func, f"model_builder({cfg}, ", ")"))


def _loss_anchor(src: _Source, heads: Sequence[str]) -> Tuple[ast.stmt, ast.Call]:
    found = []
    for stmt in src.statements():
        assigned = _assigned(stmt)
        value = assigned[1] if assigned else None
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and \
                value.func.id in heads:
            found.append((stmt, value))
    if not found:
        raise AnchorNotFound(src.filename, "loss", f"no call of {' / '.join(sorted(set(heads)))}")
    if len(found) > 1:
        lines = ", ".join(str(stmt.lineno) for stmt, _ in found)
        raise AnchorNotFound(src.filename, "loss", f"ambiguous: {len(found)} calls, lines {lines}")
    stmt, call = found[0]
    if len(call.args) not in (2, 3) or call.keywords or \
            any(isinstance(a, ast.Starred) for a in call.args):
        raise AnchorNotFound(src.filename, "loss",
                             f"line {stmt.lineno} calls it with other arguments than "
                             f"(embeddings, labels)")
    if call.lineno != stmt.lineno:
        raise AnchorNotFound(src.filename, "loss",
                             f"line {stmt.lineno}: the call must start on the assignment's line")
    return stmt, call


def _loops(src: _Source, node: ast.AST) -> List[ast.For]:
    return [n for n in src.ancestors(node) if isinstance(n, (ast.For, ast.AsyncFor))]


def _images_source(src: _Source, stmt: ast.stmt, embeddings: ast.expr) -> str:
    """The images the backbone embedded: ``img`` of ``<emb> = backbone(img)`` before the call."""
    if isinstance(embeddings, ast.Call) and embeddings.args:
        return src.segment(embeddings.args[0])
    loops = _loops(src, stmt)
    if isinstance(embeddings, ast.Name) and loops:
        best = None
        for node in ast.walk(loops[0]):
            assigned = _assigned(node) if isinstance(node, ast.stmt) else None
            if assigned and assigned[0] == embeddings.id and node.lineno < stmt.lineno and \
                    isinstance(assigned[1], ast.Call) and assigned[1].args:
                if best is None or node.lineno > best.lineno:
                    best = node
        if best is not None:
            return src.segment(_assigned(best)[1].args[0])
    raise AnchorNotFound(src.filename, "loss",
                         f"no `{src.segment(embeddings)} = <backbone>(<img>)` before line "
                         f"{stmt.lineno} in its loop")


def _epoch_name(src: _Source, stmt: ast.stmt) -> str:
    for loop in _loops(src, stmt):
        if isinstance(loop.target, ast.Name) and _call_name(loop.iter) == "range":
            return loop.target.id
    raise AnchorNotFound(src.filename, "loss",
                         f"no enclosing `for <epoch> in range(...)` around line {stmt.lineno}")


def _loader_edits(src: _Source, loop: ast.For, outer: ast.For, names: Sequence[str],
                  cfg: str) -> Tuple[str, ast.stmt, List[_Edit]]:
    """The loader the batch loop iterates: its last assignment before the training loop wrapped
    in ``keyed_loader(cfg, ...)``, and the loop's ``(img, labels)`` target extended by
    ``*sample_keys``.  ``names``: the images and labels names of the loss call."""
    source = loop.iter.args[0] if _call_name(loop.iter) == "enumerate" and loop.iter.args \
        else loop.iter
    if not isinstance(source, ast.Name):
        raise AnchorNotFound(src.filename, "loader", f"the loop at line {loop.lineno} iterates "
                                                     f"`{src.segment(loop.iter)}`")
    loader = source.id
    stmt = None
    for candidate in src.statements():
        assigned = _assigned(candidate)
        if assigned and assigned[0] == loader and candidate.lineno < outer.lineno:
            stmt = candidate
    if stmt is None:
        raise AnchorNotFound(src.filename, "loader", f"no `{loader} = ...` before line "
                                                     f"{outer.lineno}")
    tuples = [node for node in ast.walk(loop.target) if isinstance(node, (ast.Tuple, ast.List))
              and all(isinstance(e, ast.Name) for e in node.elts)
              and {e.id for e in node.elts} & set(names)]
    if not tuples or loop.iter.end_lineno != loop.lineno or loop.body[0].lineno == loop.lineno:
        raise AnchorNotFound(src.filename, "loader",
                             f"line {loop.lineno}: `{src.segment(loop.target)}` does not unpack "
                             f"{' / '.join(names)} as a tuple of names on the loop's header line")
    header = _statement_edit(src, stmt, _wrap(src, _assigned(stmt)[1], f"keyed_loader({cfg}, ",
                                              ")"))
    line, col = _end(src, tuples[-1].elts[-1])
    text = src.line(line)
    indent = src.indent(loop)
    unpack = _Edit(loop.lineno - 1, loop.lineno, indent,
                   [(text[:col] + ", *sample_keys" + text[col:])[len(indent):]])
    return loader, stmt, [header, unpack]


def _scheduler_edits(src: _Source, cfg: str, outer: ast.For, loader: str,
                     loader_stmt: ast.stmt) -> Tuple[List[_Edit], List[str], List[ast.stmt]]:
    """Every ``<sched> = <...Scheduler|LR|Warmup>(<opt>, ...)`` before the training loop, built
    as ``recipe_scheduler(cfg, <opt>, <loader>) or <the fork's construction>``."""
    edits, optimizers, stmts = [], [], []
    for stmt in src.statements():
        assigned = _assigned(stmt)
        if not assigned or stmt.lineno >= outer.lineno:
            continue
        calls = [node for node in ast.walk(assigned[1])
                 if _SCHEDULER_NAME.search(_call_name(node) or "")]
        for call in calls[:1]:
            keyword = [k.value for k in call.keywords if k.arg == "optimizer"]
            optimizer = keyword[0] if keyword else (call.args[0] if call.args else None)
            if not isinstance(optimizer, ast.Name):
                continue
            data = loader if loader_stmt.lineno < stmt.lineno else "None"
            value = assigned[1]
            plain = isinstance(value, (ast.Call, ast.Attribute, ast.Name))
            insertions = _wrap(src, value, f"recipe_scheduler({cfg}, {optimizer.id}, {data}) or "
                               + ("" if plain else "("), "" if plain else ")")
            edits.append(_statement_edit(src, stmt, insertions))
            optimizers.append(optimizer.id)
            stmts.append(stmt)
    if not edits:
        raise AnchorNotFound(src.filename, "scheduler")
    return edits, optimizers, stmts


def _clip_edits(src: _Source, outer: ast.For, cfg: str) -> List[_Edit]:
    """Every ``clip_grad_norm_(...)`` call in the training loop through ``grad_clipper``."""
    by_statement: Dict[ast.stmt, List[Tuple[int, int, str]]] = {}
    for node in ast.walk(outer):
        if _call_name(node) != "clip_grad_norm_":
            continue
        stmt = next(n for n in src.ancestors(node) if isinstance(n, ast.stmt))
        if isinstance(stmt, (ast.For, ast.While, ast.If, ast.With, ast.Try)):
            raise AnchorNotFound(src.filename, "clip", f"line {node.lineno}: the call is part of "
                                                       f"a compound statement's header")
        by_statement.setdefault(stmt, []).extend(
            _wrap(src, node.func, f"grad_clipper({cfg}, ", ")"))
    if not by_statement:
        raise AnchorNotFound(src.filename, "clip", f"none in the loop at line {outer.lineno}")
    return [_statement_edit(src, stmt, insertions) for stmt, insertions in by_statement.items()]


def _loss_edit(src: _Source, stmt: ast.stmt, call: ast.Call, head: str, cfg: str,
               backbone: str, optimizers: Sequence[str]) -> _Edit:
    indent = src.indent(stmt)
    embeddings, labels = call.args[:2]
    extra = ""
    if len(call.args) == 3:   # 2022-01 .. 2022-05: PartialFC(embeddings, labels, optimizer)
        if not (isinstance(call.args[2], ast.Name) and call.args[2].id in optimizers):
            raise AnchorNotFound(src.filename, "loss",
                                 f"line {stmt.lineno} calls it with other arguments than "
                                 f"(embeddings, labels) or (embeddings, labels, <optimizer>)")
        extra = f", fork_args=({call.args[2].id},)"
    images = _images_source(src, stmt, embeddings)
    epoch = _epoch_name(src, stmt)
    first = src.line(stmt.lineno)
    target = first[len(indent):src.col(stmt.lineno, call.col_offset)]
    tail = src.line(call.end_lineno)[src.col(call.end_lineno, call.end_col_offset):]
    lines = [
        f"{target}fork_head_loss(",
        f"    {head}, {cfg}, {backbone}, teacher, {images}, {src.segment(embeddings)},",
        f"    {src.segment(labels)}, {epoch}, sample_keys{extra}){tail}",
    ]
    return _Edit(stmt.lineno - 1, stmt.end_lineno, indent, lines)


def _teacher_edit(src: _Source, outer: ast.stmt, cfg: str, backbone: str, loader: str,
                  after: Sequence[ast.stmt]) -> _Edit:
    """Build the teacher once, just before the outermost loop around the loss call (the
    training loop): by then the fork has moved the backbone to its device."""
    late = sorted(s.lineno for s in after if s.lineno >= outer.lineno)
    if late:
        raise AnchorNotFound(src.filename, "loss",
                             f"the training loop (line {outer.lineno}) starts before line "
                             f"{late[0]}, which the teacher must follow")
    line = f"teacher = build_fork_teacher({cfg}, {backbone}, {loader})"
    return _Edit(outer.lineno - 1, outer.lineno - 1, src.indent(outer), [line])


def upstream_bugs(text: str, filename: str = "train_v2.py") -> List[str]:
    """Defects of upstream's own script that the patch leaves alone but that stop every run,
    patched or not, each with its fix (printed by the CLI after patching)."""
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError:
        return []
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
             and isinstance(n.ctx, (ast.Store, ast.Del))}
    bound |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
              for a in n.args + n.kwonlyargs}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "using_wandb" and \
                isinstance(node.ctx, ast.Load) and "using_wandb" not in bound:
            found.append(f"{filename}:{node.lineno}: reads `using_wandb`, a name the script never "
                         f"defines (upstream's train_v2.py of 2023-01-01 .. 2023-01-05): every "
                         f"run stops with NameError, patched or not. Fix it as upstream did on "
                         f"2023-02-08 (`if cfg.using_wandb:`), or train with train_distill.py")
            break
    return found


# ----------------------------------------------------------------------------- apply / revert

def _render(src: _Source, edits: List[_Edit]) -> str:
    lines = list(src.lines)
    nl = src.newline
    for edit in sorted(edits, key=lambda e: (e.start, e.stop), reverse=True):
        ind = edit.indent
        kept = [src.line(n + 1) for n in range(edit.start, edit.stop)]
        block = [ind + BEGIN + (REPLACED_NOTE if kept else "")]
        block += [(ind + KEPT + " " + k[len(ind):] if k.startswith(ind) else KEPT + " " + k)
                  if k.strip() else ind + KEPT for k in kept]
        block += [ind + line for line in edit.new_lines]
        block.append(ind + END)
        if edit.start > 0 and edit.start == edit.stop and not lines[edit.start - 1].endswith(
                ("\n", "\r")):
            lines[edit.start - 1] += nl  # inserting after a last line without a newline
        lines[edit.start:edit.stop] = [b + nl for b in block]
    return "".join(lines)


def _edits(src: _Source) -> List[_Edit]:
    _refuse_old_loops(src)
    clash = sorted(set(INTRODUCED_NAMES) & src.stored_names())
    if clash:
        raise ValueError(f"{src.filename}: cannot patch: the script already assigns {clash}, "
                         f"names the patch introduces; rename them in the fork and run again. "
                         f"Nothing was written.")
    imports = _imports_edit(src)
    config_stmt, cfg = _config_anchor(src)
    head_edits, heads, head_stmts = _head_edits(src, cfg)
    loss_stmt, call = _loss_anchor(src, heads)
    loops = _loops(src, loss_stmt)
    if not loops:
        raise AnchorNotFound(src.filename, "loss", f"line {loss_stmt.lineno} is not in a loop")
    outer = loops[-1]
    backbone, backbone_stmt, backbone_call = _backbone_anchor(src, outer.lineno)
    if backbone_stmt in head_stmts:
        raise AnchorNotFound(src.filename, "backbone",
                             f"line {backbone_stmt.lineno} also builds the head")
    names = [_images_source(src, loss_stmt, call.args[0])] + \
        [call.args[1].id] * isinstance(call.args[1], ast.Name)
    loader, loader_stmt, loader_edits = _loader_edits(src, loops[0], outer, names, cfg)
    scheduler_edits, optimizers, scheduler_stmts = _scheduler_edits(src, cfg, outer, loader,
                                                                    loader_stmt)
    loss = _loss_edit(src, loss_stmt, call, call.func.id, cfg, backbone, optimizers)
    teacher = _teacher_edit(src, outer, cfg, backbone, loader,
                            [config_stmt, backbone_stmt, loader_stmt, *head_stmts,
                             *scheduler_stmts])
    return [imports, _config_edit(config_stmt, cfg, src),
            _backbone_edit(src, backbone_stmt, backbone_call, cfg), *head_edits, *loader_edits,
            *scheduler_edits, *_clip_edits(src, outer, cfg), teacher, loss]


def revert_source(text: str, filename: str = "train_v2.py") -> str:
    """``text`` with every marked block removed and the statements it replaced restored."""
    out: List[str] = []
    block_indent: Optional[str] = None
    for number, raw in enumerate(text.splitlines(keepends=True), 1):
        body = raw.rstrip("\r\n")
        ending = raw[len(body):]
        stripped = body.strip()
        if stripped.startswith(BEGIN):
            if block_indent is not None:
                raise MarkerError(f"{filename}:{number}: '{BEGIN}' inside another block; "
                                  f"restore the file from its .orig backup")
            block_indent = body[:len(body) - len(body.lstrip())]
        elif stripped.startswith(END):
            if block_indent is None:
                raise MarkerError(f"{filename}:{number}: '{END}' without its '{BEGIN}'; "
                                  f"restore the file from its .orig backup")
            block_indent = None
        elif block_indent is None:
            out.append(raw)
        else:
            kept = _KEPT_LINE.match(body)
            if kept is None:
                continue  # a line the patch added
            lead, rest = kept.groups()
            rest = rest[1:] if rest.startswith(" ") else rest
            restored = (block_indent + rest) if lead == block_indent else rest
            out.append((restored if restored.strip() else "") + ending)
    if block_indent is not None:
        raise MarkerError(f"{filename}: a '{BEGIN}' block is never closed by '{END}'; "
                          f"restore the file from its .orig backup")
    return "".join(out)


def patch_source(text: str, filename: str = "train_v2.py") -> str:
    """The patched ``text``; an already patched text comes back unchanged (idempotent).

    Raises:
        AnchorNotFound: a place to patch is missing (message: anchor, pattern, manual fix).
        MarkerError: the marker blocks of an earlier patch are damaged.
        ValueError: ``text`` is not valid Python.
    """
    base = revert_source(text, filename) if BEGIN in text or END in text else text
    src = _Source(base, filename)
    patched = _render(src, _edits(src))
    try:
        ast.parse(patched, filename=filename)
    except SyntaxError as error:  # a layout the anchors did not foresee: never write it
        raise ValueError(f"{filename}: the patched file would not parse ({error.msg} at line "
                         f"{error.lineno}); patch it by hand (see patches/README.md)") from error
    return patched


# ----------------------------------------------------------------------------- files and CLI

@dataclass(frozen=True)
class PatchResult:
    """What ``patch_file`` did: ``changed`` (or would change), the unified ``diff`` and the
    ``backup`` path written (None for a dry run or no change)."""
    changed: bool
    diff: str
    backup: Optional[str]


def _atomic_write(path: str, text: str, mode_from: Optional[str] = None) -> None:
    """Write ``text`` to ``path`` through a temporary file + rename; the file gets the mode of
    ``mode_from`` (default: of ``path`` itself when it exists)."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".kdface_", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        model = mode_from or path
        if os.path.exists(model):
            shutil.copymode(model, tmp)
        else:  # a new file: what open() would have made under the user's umask
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def patch_file(path: str, dry_run: bool = False, revert: bool = False) -> PatchResult:
    """Patch (or with ``revert`` un-patch) the file at ``path``.

    Writes nothing when ``dry_run``, when nothing changes, or when an anchor is missing (then
    AnchorNotFound propagates).  Otherwise replaces the file atomically, keeping its mode; a
    patch first saves the current content as ``<path>.orig`` (with the file's mode).  A revert
    writes no backup and leaves ``.orig`` alone: it restores the original exactly, and the
    patched file is one ``patch`` away.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass the fork's "
                                f"recognition/arcface_torch/train_v2.py (train.py in a fork of "
                                f"2022-01 .. 2022-05)")
    with open(path, encoding="utf-8", newline="") as handle:
        before = handle.read()
    after = revert_source(before, path) if revert else patch_source(before, path)
    diff = "".join(difflib.unified_diff(before.splitlines(keepends=True),
                                        after.splitlines(keepends=True), fromfile=path,
                                        tofile=path + (" (reverted)" if revert else " (patched)")))
    if dry_run or after == before:
        return PatchResult(after != before, diff, None)
    backup = None
    if not revert:
        backup = path + ".orig"
        _atomic_write(backup, before, mode_from=path)
    _atomic_write(path, after)
    return PatchResult(True, diff, backup)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Patch a fork's arcface_torch train_v2.py to train with kdface distillation "
                    "(edits between '# >>> kdface distill' markers; idempotent)")
    parser.add_argument("train_v2", help="path to the fork's train_v2.py (a 2022-01 .. 2022-05 "
                                         "fork: its train.py)")
    parser.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    parser.add_argument("--revert", action="store_true", help="remove a previous patch")
    args = parser.parse_args(argv)
    try:
        result = patch_file(args.train_v2, dry_run=args.dry_run, revert=args.revert)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    action = "reverted" if args.revert else "patched"
    with open(args.train_v2, encoding="utf-8") as handle:
        for bug in upstream_bugs(handle.read(), args.train_v2):
            print(f"warning: {bug}", file=sys.stderr)
    if not result.changed:
        print(f"{args.train_v2}: already {action}, nothing to do")
    elif args.dry_run:
        sys.stdout.write(result.diff)
        print(f"(dry run: {args.train_v2} would be {action}; nothing written)")
    else:
        saved = f" (previous content saved as {result.backup})" if result.backup else ""
        print(f"{args.train_v2}: {action}{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
