"""MXNet RecordIO (``.rec`` + ``.idx``) reading and writing without mxnet (numpy + stdlib only).

File format (little-endian), as written by MXNet's ``MXIndexedRecordIO``:

- a record is ``uint32 magic 0xced7230a``, ``uint32 lrec = (cflag << 29) | length``, ``length``
  bytes of data, zero padding to a multiple of 4 bytes;
- ``cflag`` 0 is a whole record; 1 / 2 / 3 are the first / middle / last part of a record the
  writer split because its data held the magic word at a 4-byte-aligned offset: the magic word is
  dropped at the split and the reader puts it back between the parts;
- the ``.idx`` file has one ``key<TAB>offset`` line per record, offset = byte offset of the
  record's first magic word in the ``.rec`` file;
- a record's data is an ``IRHeader`` (struct ``<IfQQ``: flag, label, id, id2; 24 bytes), then, when
  ``flag > 0``, ``flag`` float32 labels (the scalar label is then 0), then the body (image bytes).

``RecordReader`` opens the ``.rec`` file lazily and again in every new process (DataLoader
workers, fork or spawn), memory-mapped.  ``RecordWriter`` writes both files under temporary names
and renames them on ``close()``.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")            # magic, lrec
_IR = struct.Struct("<IfQQ")            # flag, label, id, id2
IR_HEADER_SIZE = _IR.size               # 24
MAX_RECORD_LEN = (1 << 29) - 1          # length field has 29 bits

Label = Union[float, np.ndarray]


@dataclass(frozen=True)
class IRHeader:
    """Header of one record.

    Args:
        flag: number of float32 labels stored after the header (0 = one scalar label).
        label: the scalar label when ``flag == 0``, else a float32 array ``[flag]``.
        id: first id field (``uint64``); the record key for InsightFace / im2rec sets.
        id2: second id field (``uint64``).
    """
    flag: int
    label: Label
    id: int
    id2: int

    @property
    def first_label(self) -> float:
        """The class label as arcface_torch reads it: the scalar label or the first float."""
        if self.flag > 0:
            return float(self.label[0])
        return float(self.label)


def make_header(label: Union[float, Sequence[float], np.ndarray], id: int = 0,
                id2: int = 0) -> IRHeader:
    """Build an ``IRHeader``: a number gives ``flag = 0``; a sequence/array gives ``flag = len``
    (even of length 1), as MXNet's ``pack`` does."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IRHeader(0, float(label), int(id), int(id2))
    arr = np.ascontiguousarray(label, dtype="<f4").reshape(-1)
    if arr.size == 0:
        raise ValueError("make_header: a label array needs at least one value")
    return IRHeader(int(arr.size), arr, int(id), int(id2))


def pack(header: IRHeader, body: bytes) -> bytes:
    """Record data = ``IRHeader`` + float32 labels (when ``flag > 0``) + ``body``."""
    if header.flag > 0:
        labels = np.ascontiguousarray(header.label, dtype="<f4").reshape(-1)
        if labels.size != header.flag:
            raise ValueError(f"pack: header.flag={header.flag} but {labels.size} labels given")
        return _IR.pack(header.flag, 0.0, header.id, header.id2) + labels.tobytes() + bytes(body)
    return _IR.pack(0, float(header.label), header.id, header.id2) + bytes(body)


def pack_record(label: Union[float, Sequence[float], np.ndarray], body: bytes, id: int = 0,
                id2: int = 0) -> bytes:
    """Record data from a label (number, or sequence of floats), ids and body (image bytes)."""
    return pack(make_header(label, id, id2), body)


def unpack(data: bytes, where: str = "record") -> Tuple[IRHeader, bytes]:
    """Split record data into ``(IRHeader, body)``; ``where`` names the record in errors."""
    if len(data) < IR_HEADER_SIZE:
        raise ValueError(f"{where}: record data is {len(data)} bytes, shorter than the "
                         f"{IR_HEADER_SIZE}-byte IRHeader; the file is corrupt")
    flag, label, id_, id2 = _IR.unpack_from(data, 0)
    if flag == 0:
        return IRHeader(0, float(label), id_, id2), bytes(data[IR_HEADER_SIZE:])
    end = IR_HEADER_SIZE + 4 * flag
    if len(data) < end:
        raise ValueError(f"{where}: IRHeader flag={flag} announces {flag} float32 labels but "
                         f"the record data is only {len(data)} bytes; the file is corrupt")
    labels = np.frombuffer(data, dtype="<f4", count=flag, offset=IR_HEADER_SIZE).astype(np.float32)
    return IRHeader(flag, labels, id_, id2), bytes(data[end:])


def frame(data: bytes) -> bytes:
    """Encode record data as it is laid out in a ``.rec`` file, MXNet's way: split at every
    4-byte-aligned magic word (cflag 1/2/3, the magic word dropped), pad the end to 4 bytes."""
    n = len(data)
    if n > MAX_RECORD_LEN:
        raise ValueError(f"record of {n} bytes exceeds the RecordIO limit of {MAX_RECORD_LEN}")
    aligned = np.frombuffer(data, dtype="<u4", count=n // 4)
    cuts = (np.flatnonzero(aligned == MAGIC) * 4).tolist()
    out = bytearray()
    start = 0
    for cut in cuts:
        out += _LREC.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (cut - start))
        out += data[start:cut]
        start = cut + 4
    out += _LREC.pack(MAGIC, ((3 if cuts else 0) << 29) | (n - start))
    out += data[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def read_idx(idx_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file into ``(keys, offsets)`` int64 arrays in file order.

    Raises ValueError naming the file and line on a malformed line or a repeated key."""
    with open(idx_path, "rb") as f:
        raw = f.read()
    parsed = _parse_idx_fast(raw)
    if parsed is not None:
        _check_unique(parsed[:, 0], idx_path)
        return parsed[:, 0].copy(), parsed[:, 1].copy()
    lines = raw.splitlines()
    keys_l: List[int] = []
    offsets_l: List[int] = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split(b"\t") if b"\t" in line else line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
            if key < 0 or offset < 0:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{idx_path}: line {lineno} is malformed ({line[:60]!r}); expected "
                f"'key<TAB>offset' with two non-negative integers; rebuild the .idx "
                f"from the .rec") from None
        keys_l.append(key)
        offsets_l.append(offset)
    keys = np.asarray(keys_l, dtype=np.int64)
    _check_unique(keys, idx_path)
    return keys, np.asarray(offsets_l, dtype=np.int64)


def _parse_idx_fast(raw: bytes) -> Optional[np.ndarray]:
    """``[L, 2]`` int64 when every line is ``key<TAB>offset`` with non-negative integers (checked
    vectorised: one tab per line, ``2 L`` integers), else None (the caller reports the line)."""
    if not raw:
        return np.zeros((0, 2), dtype=np.int64)
    data = np.frombuffer(raw, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    num_lines = newlines.size + int(raw[-1:] != b"\n")
    tabs_per_line = np.bincount(np.searchsorted(newlines, np.flatnonzero(data == 9)),
                                minlength=num_lines)
    if tabs_per_line.size != num_lines or not (tabs_per_line == 1).all():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = np.fromstring(raw.decode("ascii"), dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning, UnicodeDecodeError):
        return None
    if values.size != 2 * num_lines or (values < 0).any():
        return None
    return values.reshape(-1, 2)


def _check_unique(keys: np.ndarray, idx_path: str) -> None:
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if uniq.size != keys.size:
        dup = int(uniq[counts > 1][0])
        lines = np.flatnonzero(keys == dup)[:2] + 1
        raise ValueError(f"{idx_path}: key {dup} appears twice (lines {lines[0]} and "
                         f"{lines[1]}); a .idx must list each key once")


class RecordReader:
    """Random access to an indexed ``.rec`` file.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` file; default: ``rec_path`` with the extension ``.idx``.

    ``read(key)`` returns ``(IRHeader, body)``; ``read_raw(key)`` the whole record data (header
    included, split parts joined).  Picklable: the file is (re)opened lazily in each process.
    """

    def __init__(self, rec_path: str, idx_path: Optional[str] = None) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else \
            os.path.splitext(self.rec_path)[0] + ".idx"
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        if not os.path.isfile(self.idx_path):
            raise FileNotFoundError(f"RecordIO index not found: {self.idx_path} "
                                    f"(needed next to {self.rec_path})")
        self.key_array, self.offset_array = read_idx(self.idx_path)
        order = np.argsort(self.key_array, kind="stable")
        self._sorted_keys = self.key_array[order]
        self._sorted_offsets = self.offset_array[order]
        self._keys_list: Optional[List[int]] = None
        self._pid: Optional[int] = None
        self._file: Optional[BinaryIO] = None
        self._buf: Union[mmap.mmap, bytes, None] = None

    # -- index -------------------------------------------------------------------------------
    @property
    def keys(self) -> List[int]:
        """Record keys in ``.idx`` order (``key_array`` is the same as an int64 array)."""
        if self._keys_list is None:
            self._keys_list = self.key_array.tolist()
        return self._keys_list

    def __len__(self) -> int:
        return int(self.key_array.size)

    def __contains__(self, key: int) -> bool:
        return self._find(key) is not None

    def _find(self, key: int) -> Optional[int]:
        pos = int(np.searchsorted(self._sorted_keys, key))
        if pos < self._sorted_keys.size and self._sorted_keys[pos] == key:
            return int(self._sorted_offsets[pos])
        return None

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """``[N]`` int64 byte offsets of ``keys [N]`` (vectorised ``offset``; KeyError naming
        the first key the index lacks)."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), max(len(self) - 1, 0))
        missing = np.flatnonzero(self._sorted_keys[pos] != keys) if len(self) else \
            np.arange(keys.size)
        if missing.size:
            self.offset(int(keys[missing[0]]))          # raises the KeyError
        return self._sorted_offsets[pos].copy() if len(self) else np.zeros(0, np.int64)

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s record in the ``.rec`` file (KeyError if not indexed)."""
        off = self._find(int(key))
        if off is None:
            raise KeyError(f"{self.idx_path}: key {key} is not in the index "
                           f"({len(self)} keys); check the key or rebuild the .idx")
        return off

    # -- file --------------------------------------------------------------------------------
    def _buffer(self) -> Union[mmap.mmap, bytes]:
        pid = os.getpid()
        if self._buf is None or self._pid != pid:
            # a forked child must not share the parent's file position: reopen.  Closing the
            # inherited copies only affects this process.
            self.close()
            f = open(self.rec_path, "rb")
            stat = os.fstat(f.fileno())
            identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            first = getattr(self, "_identity", None)
            if first is not None and identity != first:
                f.close()
                raise RuntimeError(f"{self.rec_path} was replaced or modified after it was first "
                                   f"opened (its .idx offsets may no longer match); restart the "
                                   f"job so every process reads the same file")
            self._identity = identity
            size = stat.st_size
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._file, self._pid = f, pid
        return self._buf

    def close(self) -> None:
        """Release the file and its mapping (the next read reopens them)."""
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        if self._file is not None:
            self._file.close()
        self._buf, self._file, self._pid = None, None, None

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_buf=None, _file=None, _pid=None, _keys_list=None)
        return state

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:     # absent if __init__ raised
            try:
                self.close()
            except (BufferError, OSError, ValueError):     # views still exported / shutdown
                pass

    # -- records -----------------------------------------------------------------------------
    def read_at(self, offset: int, key: object = "?") -> bytes:
        """Record data starting at byte ``offset`` (split parts joined, padding removed)."""
        buf = self._buffer()
        size = len(buf)
        parts: List[bytes] = []
        pos = offset
        while True:
            where = f"{self.rec_path}: key {key}, byte offset {pos}"
            if pos + 8 > size:
                raise ValueError(f"{where}: truncated file ({size} bytes) where a record header "
                                 f"was expected; the .rec is incomplete or the .idx is stale")
            magic, lrec = _LREC.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ValueError(f"{where}: bad magic word 0x{magic:08x} (expected "
                                 f"0x{MAGIC:08x}); the .idx does not match the .rec or the "
                                 f"file is corrupt")
            cflag, length = lrec >> 29, lrec & MAX_RECORD_LEN
            if (cflag in (0, 1)) != (not parts):
                raise ValueError(f"{where}: unexpected part flag cflag={cflag} "
                                 f"({'continuation' if not parts else 'new record'} "
                                 f"where the other was expected); the file is corrupt")
            if pos + 8 + length > size:
                raise ValueError(f"{where}: truncated file: the record needs {length} bytes "
                                 f"but only {size - pos - 8} remain")
            parts.append(bytes(buf[pos + 8:pos + 8 + length]))
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def read_raw(self, key: int) -> bytes:
        """Whole record data of ``key`` (IRHeader + labels + body)."""
        return self.read_at(self.offset(key), key)

    def read(self, key: int) -> Tuple[IRHeader, bytes]:
        """``(IRHeader, body)`` of ``key``; body = bytes after the header and labels."""
        offset = self.offset(key)
        return unpack(self.read_at(offset, key),
                      f"{self.rec_path}: key {key}, byte offset {offset}")

    def scan_labels(self, keys: np.ndarray, chunk: int = 1 << 16
                    ) -> Tuple[np.ndarray, Dict[int, str]]:
        """First label (``IRHeader.first_label``) of many records, vectorised over the mmap.

        Args:
            keys: ``[N]`` int record keys.
            chunk: records gathered per numpy step.

        Returns ``(labels [N] float64, problems)``: ``problems`` maps the position in ``keys``
        of every unreadable record (missing key, truncated file, bad magic word, bad part flag,
        header shorter than announced) to its error message; its label is NaN.  Records whose
        header is split across parts, or that end within 36 bytes of the file end, are read one
        by one with ``read``.
        """
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        labels = np.full(keys.size, np.nan)
        problems: Dict[int, str] = {}
        pos = np.searchsorted(self._sorted_keys, keys)
        found = pos < self._sorted_keys.size
        found[found] = self._sorted_keys[pos[found]] == keys[found]
        for i in np.flatnonzero(~found).tolist():
            problems[i] = (f"{self.idx_path}: key {int(keys[i])} is not in the index "
                           f"({len(self)} keys); check the key or rebuild the .idx")
        offsets = np.where(found, self._sorted_offsets[np.minimum(pos, len(self) - 1)]
                           if len(self) else 0, 0)
        buf = self._buffer()
        size = len(buf)
        slow: List[int] = []
        if size:
            data = np.frombuffer(buf, dtype=np.uint8)
            span = np.arange(36)
            for lo in range(0, keys.size, chunk):
                sel = np.arange(lo, min(lo + chunk, keys.size))
                sel = sel[found[sel]]
                inside = offsets[sel] + 36 <= size
                slow.extend(sel[~inside].tolist())
                sel = sel[inside]
                words = data[offsets[sel][:, None] + span].view("<u4")     # [n, 9]
                magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2]
                cflag, length = lrec >> 29, lrec & MAX_RECORD_LEN
                need = IR_HEADER_SIZE + 4 * flag.astype(np.int64)
                fast = (magic == MAGIC) & (cflag == 0) & (length >= need)
                first = np.where(flag > 0, words[:, 8].view("<f4"), words[:, 3].view("<f4"))
                labels[sel[fast]] = first[fast]
                slow.extend(sel[~fast].tolist())
            del data
        else:
            slow.extend(np.flatnonzero(found).tolist())
        for i in slow:
            try:
                labels[i] = self.read(int(keys[i]))[0].first_label
            except ValueError as exc:
                problems[i] = str(exc)
        return labels, problems


class RecordWriter:
    """Write an indexed ``.rec`` + ``.idx`` pair, atomically.

    Args:
        rec_path: the ``.rec`` file to create (replaced on ``close()``).
        idx_path: its ``.idx`` file; default: ``rec_path`` with the extension ``.idx``.

    Both files are written under temporary names and renamed by ``close()``; leaving a ``with``
    block by an exception discards them.  Keys must be unique non-negative integers.
    """

    def __init__(self, rec_path: str, idx_path: Optional[str] = None) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else \
            os.path.splitext(self.rec_path)[0] + ".idx"
        suffix = f".tmp{os.getpid()}"
        self._tmp_rec, self._tmp_idx = self.rec_path + suffix, self.idx_path + suffix
        self._rec: Optional[BinaryIO] = open(self._tmp_rec, "wb")
        self._idx: Optional[BinaryIO] = open(self._tmp_idx, "wb")
        self._keys: set = set()
        self._offset = 0
        self.num_split = 0      # records written in several parts (magic word in the data)

    def write_raw(self, key: int, data: bytes) -> int:
        """Append record data under ``key``; return the record's byte offset."""
        if self._rec is None or self._idx is None:
            raise ValueError(f"{self.rec_path}: write after close()")
        key = int(key)
        if key < 0 or key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} is negative or already written")
        framed = frame(data)
        if len(framed) - 8 - (-len(data) % 4) != len(data):
            self.num_split += 1
        offset = self._offset
        self._rec.write(framed)
        self._idx.write(f"{key}\t{offset}\n".encode())
        self._keys.add(key)
        self._offset += len(framed)
        return offset

    def write(self, key: int, header: IRHeader, body: bytes = b"") -> int:
        """Append ``pack(header, body)`` under ``key``; return its byte offset."""
        return self.write_raw(key, pack(header, body))

    def close(self) -> None:
        """Flush and move both files into place."""
        if self._rec is None or self._idx is None:
            return
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._rec = self._idx = None
        os.replace(self._tmp_rec, self.rec_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        """Discard everything written so far."""
        for f in (self._rec, self._idx):
            if f is not None:
                f.close()
        self._rec = self._idx = None
        for path in (self._tmp_rec, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
