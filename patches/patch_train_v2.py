"""Patch a fork's own arcface_torch ``train_v2.py`` so that it trains with the distillation plugin.

    python patches/patch_train_v2.py path/to/train_v2.py              # patch (keeps .orig)
    python patches/patch_train_v2.py path/to/train_v2.py --dry-run    # print the diff only
    python patches/patch_train_v2.py path/to/train_v2.py --revert     # remove the patch

The places to change are found by their meaning in the Python syntax tree, never by line number,
so a fork that moved, renamed or reformatted things is still patched correctly:

- imports: after the last module-level import before the first ``def``/``class``, import
  ``build_head`` and the patched loop's helpers of ``plugins/fork_loop.py``;
- config: after ``<cfg> = get_config(...)``: ``prepare_fork_config(<cfg>)`` -- a job that sets
  no ``distill`` key is one of the fork's own and is left untouched (it trains, and dumps its
  config, exactly as before); for ours: distillation defaults, start-up checks, a warning per key
  the fork's loop does not honour (those keys leave the config);
- head: every ``<head> = PartialFC_V2(...)`` (possibly chained, e.g. ``.cuda()``) becomes
  ``build_head(<cfg>) if distill_method(<cfg>) != "none" else PartialFC_V2(...)``; the fork's
  own device move of ``<head>`` then applies to whichever module was built;
- backbone: ``<net> = ...get_model(...)...`` calls ``model_builder(<cfg>, get_model)(...)``
  instead: the fork's ``get_model`` for its own jobs, ``plugins.backbones.resolve_model`` (the
  fork's names first, then the bundled ones) for ours;
- teacher: just before the outermost loop around the loss call (the training loop), once,
  ``teacher = build_fork_teacher(<cfg>, <net>)`` (on the backbone's device);
- loss: the single ``<loss> = <head>(<emb>, <labels>)`` inside that loop, after
  ``<emb> = <net>(<img>)`` and inside ``for <epoch> in range(...)``, becomes
  ``fork_head_loss(<head>, <cfg>, <net>, teacher, <img>, <emb>, <labels>, <epoch>)``: the fork's
  own call for ``distill = "none"``; else the plugin's head with the embeddings' gradient scaled
  by the DDP world size, as upstream's PartialFC_V2 does, so that the fork's DDP average gives
  the gradient of the global-batch mean loss on any GPU count.

Every change sits between ``# >>> kdface distill`` and ``# <<< kdface distill``; a replaced
statement is kept inside its block as ``#|`` comment lines, so ``--revert`` restores the file
exactly and patching twice gives the same file.  If an anchor is missing, nothing is written and
the message names the anchor, the pattern searched and what to add by hand.  The file is written
atomically (temporary file + rename) after the original is saved as ``<file>.orig``.

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
    "from plugins.builders import build_head",
    "from plugins.fork_loop import (build_fork_teacher, distill_method, fork_head_loss, "
    "model_builder,",
    "                               prepare_fork_config)",
)
# Names the patch introduces; a fork that already binds one of them would be silently shadowed.
INTRODUCED_NAMES = ("teacher", "build_head", "build_fork_teacher", "distill_method",
                    "fork_head_loss", "model_builder", "prepare_fork_config")


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
        "an assignment `<head> = PartialFC_V2(...)` (the call may be chained, e.g. "
        "`PartialFC_V2(...).cuda()`)",
        "replace the construction by\n"
        "    module_partial_fc = build_head(cfg) if distill_method(cfg) != \"none\" else "
        "PartialFC_V2(...)\n"
        "  and move it to the GPU as the fork does (e.g. module_partial_fc.train().cuda())"),
    "backbone": Anchor(
        "the construction of the student backbone",
        "an assignment `<net> = get_model(...)` (also chained, e.g. `get_model(...).cuda()`) "
        "before the training loop",
        "call the builder through the plugin, and before the training loop, once:\n"
        "    backbone = model_builder(cfg, get_model)(cfg.network, ...)\n"
        "    teacher = build_fork_teacher(cfg, backbone)"),
    "loss": Anchor(
        "the loss call inside the loader loop",
        "exactly one assignment `<loss> = <head>(<embeddings>, <labels>)` where <head> is the "
        "PartialFC_V2 variable, inside `for ... in ...:` loops, with `<embeddings> = "
        "<backbone>(<img>)` before it and an enclosing `for <epoch> in range(...):`",
        "in the loop, replacing the loss call:\n"
        "    loss = fork_head_loss(module_partial_fc, cfg, backbone, teacher, img, "
        "local_embeddings, local_labels, epoch)"),
}


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
        call = _find_call(assigned[1], "PartialFC_V2") if assigned else None
        if call is None:
            continue
        chained = call is not assigned[1]
        first, last = call.lineno, call.end_lineno
        start = src.col(first, call.col_offset)
        stop = src.col(last, call.end_col_offset)
        choice = f"build_head({cfg}) if distill_method({cfg}) != \"none\" else "
        new = [src.line(n) for n in range(stmt.lineno, stmt.end_lineno + 1)]
        i, j = first - stmt.lineno, last - stmt.lineno
        if chained:  # (build_head(cfg) if ... else PartialFC_V2(...)).cuda(): mirror the fork
            new[j] = new[j][:stop] + ")" + new[j][stop:]
            choice = "(" + choice
        new[i] = new[i][:start] + choice + new[i][start:]
        indent = src.indent(stmt)
        # continuation lines inside the call's parentheses may sit left of the statement; their
        # indentation is free, so re-indenting them is harmless (the #| copy keeps the original)
        edits.append(_Edit(stmt.lineno - 1, stmt.end_lineno, indent,
                           [line[len(indent):] if line.startswith(indent) else line.lstrip()
                            for line in new]))
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
    func = call.func
    line = func.end_lineno
    new = [src.line(n) for n in range(stmt.lineno, stmt.end_lineno + 1)]
    i = line - stmt.lineno
    if func.lineno != line:
        raise AnchorNotFound(src.filename, "backbone",
                             f"line {stmt.lineno}: the name of get_model spans lines")
    start, stop = src.col(line, func.col_offset), src.col(line, func.end_col_offset)
    new[i] = new[i][:start] + f"model_builder({cfg}, {new[i][start:stop]})" + new[i][stop:]
    indent = src.indent(stmt)
    return _Edit(stmt.lineno - 1, stmt.end_lineno, indent,
                 [text[len(indent):] if text.startswith(indent) else text.lstrip()
                  for text in new])


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
    if len(call.args) != 2 or call.keywords or \
            any(isinstance(a, ast.Starred) for a in call.args):
        raise AnchorNotFound(src.filename, "loss",
                             f"line {stmt.lineno} calls it with other arguments than "
                             f"(embeddings, labels)")
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


def _loss_edit(src: _Source, stmt: ast.stmt, call: ast.Call, head: str, cfg: str,
               backbone: str) -> _Edit:
    indent = src.indent(stmt)
    embeddings, labels = call.args
    images = _images_source(src, stmt, embeddings)
    epoch = _epoch_name(src, stmt)
    if call.lineno != stmt.lineno:
        raise AnchorNotFound(src.filename, "loss",
                             f"line {stmt.lineno}: the call must start on the assignment's line")
    first = src.line(stmt.lineno)
    target = first[len(indent):src.col(stmt.lineno, call.col_offset)]
    tail = src.line(call.end_lineno)[src.col(call.end_lineno, call.end_col_offset):]
    lines = [
        f"{target}fork_head_loss(",
        f"    {head}, {cfg}, {backbone}, teacher, {images}, {src.segment(embeddings)},",
        f"    {src.segment(labels)}, {epoch}){tail}",
    ]
    return _Edit(stmt.lineno - 1, stmt.end_lineno, indent, lines)


def _teacher_edit(src: _Source, outer: ast.stmt, cfg: str, backbone: str,
                  after: Sequence[ast.stmt]) -> _Edit:
    """Build the teacher once, just before the outermost loop around the loss call (the
    training loop): by then the fork has moved the backbone to its device."""
    late = [s.lineno for s in after if s.lineno >= outer.lineno]
    if late:
        raise AnchorNotFound(src.filename, "loss",
                             f"the training loop (line {outer.lineno}) starts before line "
                             f"{late[0]}, which the teacher must follow")
    line = f"teacher = build_fork_teacher({cfg}, {backbone})"
    return _Edit(outer.lineno - 1, outer.lineno - 1, src.indent(outer), [line])


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
    backbone, backbone_stmt, backbone_call = _backbone_anchor(src, loops[-1].lineno)
    if backbone_stmt in head_stmts:
        raise AnchorNotFound(src.filename, "backbone",
                             f"line {backbone_stmt.lineno} also builds the head")
    teacher = _teacher_edit(src, loops[-1], cfg, backbone,
                            [config_stmt, backbone_stmt, *head_stmts])
    loss = _loss_edit(src, loss_stmt, call, call.func.id, cfg, backbone)
    return [imports, _config_edit(config_stmt, cfg, src),
            _backbone_edit(src, backbone_stmt, backbone_call, cfg), *head_edits, teacher, loss]


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
                                f"recognition/arcface_torch/train_v2.py")
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
    parser.add_argument("train_v2", help="path to the fork's train_v2.py")
    parser.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    parser.add_argument("--revert", action="store_true", help="remove a previous patch")
    args = parser.parse_args(argv)
    try:
        result = patch_file(args.train_v2, dry_run=args.dry_run, revert=args.revert)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    action = "reverted" if args.revert else "patched"
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
