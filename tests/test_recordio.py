"""RecordIO reader/writer: mxnet-written fixtures, byte-exact rewriting, split records, errors."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest

from data.image_codec import decode_rgb
from plugins.recordio import (MAGIC, IRHeader, RecordReader, RecordWriter, frame, make_header,
                              pack, pack_record, read_idx, unpack)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "recordio")
with open(os.path.join(FIXTURES, "expected.json")) as _f:
    EXPECTED = json.load(_f)
SETS = ["im2rec_style", "insightface_style"]
MAGIC_BYTES = struct.pack("<I", MAGIC)


def _reader(name: str) -> RecordReader:
    return RecordReader(os.path.join(FIXTURES, name, "train.rec"))


@pytest.mark.parametrize("name", SETS)
def test_fixture_records_match_expected(name):
    reader = _reader(name)
    expected = EXPECTED[name]
    assert sorted(reader.keys) == sorted(int(k) for k in expected)
    for key, exp in expected.items():
        header, body = reader.read(int(key))
        assert header.flag == exp["flag"], key
        assert np.atleast_1d(header.label).astype(float).tolist() == exp["label"], key
        assert (header.id, header.id2) == (exp["id"], exp["id2"]), key
        assert len(body) == exp["payload_len"], key
        assert hashlib.sha256(body).hexdigest() == exp["payload_sha256"], key
        if "decoded_rgb_mean" in exp:
            img = decode_rgb(body)
            assert list(img.shape) == exp["decoded_shape"]
            np.testing.assert_allclose(img.reshape(-1, 3).mean(0), exp["decoded_rgb_mean"],
                                       atol=1.0)
    reader.close()


def test_fixture_idx_order_and_header_record():
    reader = _reader("insightface_style")
    assert reader.keys == list(range(1, 23)) + [0]      # header record written last
    header, body = reader.read(0)
    assert header.flag == 2 and body == b""
    assert header.label.dtype == np.float32 and header.first_label == 18.0


@pytest.mark.parametrize("name", SETS)
def test_writer_reproduces_mxnet_files_byte_for_byte(name, tmp_path):
    """Re-writing every record in .idx order gives the mxnet-written .rec and .idx exactly,
    including the record mxnet split around aligned magic words (im2rec_style key 5)."""
    reader = _reader(name)
    out = str(tmp_path / "copy.rec")
    with RecordWriter(out) as writer:
        for key in reader.keys:
            writer.write_raw(key, reader.read_raw(key))
    assert writer.num_split == (1 if name == "im2rec_style" else 0)
    for ext in ("rec", "idx"):
        with open(os.path.join(FIXTURES, name, f"train.{ext}"), "rb") as a, \
                open(str(tmp_path / f"copy.{ext}"), "rb") as b:
            assert a.read() == b.read(), ext


def test_round_trip_split_record_and_multi_float_labels(tmp_path):
    # body where the magic word sits at aligned offsets of the record data (header is 24 bytes,
    # 3 labels are 12 more: body offsets 0 and 8 are data offsets 36 and 44) and one unaligned
    body = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"x" + MAGIC_BYTES + b"tail"
    records = {
        3: (make_header([1.5, -2.0, 7.0], id=3, id2=9), body),
        1: (make_header(4.0, id=1), b"\xff\xd8jpeg-ish"),
        2: (make_header([5.0], id=2), b""),                      # flag 1 even for one label
        0: (make_header(0.0), MAGIC_BYTES),                      # data offset 24: split
    }
    path = str(tmp_path / "t.rec")
    with RecordWriter(path) as writer:
        offsets = {key: writer.write(key, *rec) for key, rec in records.items()}
    assert writer.num_split == 2
    with open(path, "rb") as f:
        raw = f.read()
    # key 3 is stored as 3 parts: cflag 1 (36 bytes), 2 (4 bytes: 'abcd'), 3 (the rest)
    pos, parts = offsets[3], []
    for _ in range(3):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        parts.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + parts[-1][1] + (-parts[-1][1] % 4)
    assert parts == [(1, 36), (2, 4), (3, len(body) - 12)]
    reader = RecordReader(path)
    assert reader.keys == [3, 1, 2, 0]
    for key, (header, payload) in records.items():
        got_header, got_body = reader.read(key)
        assert got_body == payload
        assert got_header.flag == header.flag and got_header.id == header.id
        assert got_header.id2 == header.id2
        np.testing.assert_array_equal(np.atleast_1d(got_header.label),
                                      np.atleast_1d(header.label))
    assert reader.read(2)[0].flag == 1 and reader.read(1)[0].label == 4.0
    labels, problems = reader.scan_labels(np.array([3, 1, 2, 0, 42]))
    np.testing.assert_array_equal(labels[:4], [1.5, 4.0, 5.0, 0.0])
    assert list(problems) == [4] and "key 42" in problems[4]


def test_frame_pads_and_does_not_split_unaligned_magic():
    data = b"ab" + MAGIC_BYTES + b"c"          # magic at offset 2: not aligned
    framed = frame(data)
    assert framed == MAGIC_BYTES + struct.pack("<I", 7) + data + b"\0"     # padded to 4
    assert unpack(pack(IRHeader(0, 2.0, 5, 6), b"z")) == (IRHeader(0, 2.0, 5, 6), b"z")
    data = pack_record([3.0, 0.25], b"img", id=8, id2=2)
    assert data == struct.pack("<IfQQff", 2, 0.0, 8, 2, 3.0, 0.25) + b"img"


def test_reader_survives_pickle_and_process_change():
    reader = _reader("im2rec_style")
    first = reader.read_raw(5)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_raw(5) == first
    reader._pid = -1                             # as seen by a forked worker: reopen
    assert reader.read_raw(5) == first and reader._pid == os.getpid()


# -- bad data ---------------------------------------------------------------------------------

def _copy(tmp_path, name="im2rec_style"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    return str(dst / "train.rec"), str(dst / "train.idx")


def test_truncated_rec_names_file_key_offset(tmp_path):
    rec, idx = _copy(tmp_path)
    size = os.path.getsize(rec)
    with open(rec, "r+b") as f:
        f.truncate(size - 100)                 # cuts the last record (key 0 at 40940)
    reader = RecordReader(rec)
    with pytest.raises(ValueError, match=r"train\.rec: key 0, byte offset 40940: truncated "
                                         r"file: the record needs 4591 bytes but only 4492 remain"):
        reader.read(0)
    with open(rec, "r+b") as f:
        f.truncate(40944)                      # not even a whole record header
    with pytest.raises(ValueError, match=r"key 0, byte offset 40940: truncated file \(40944 "
                                         r"bytes\) where a record header was expected"):
        RecordReader(rec).read(0)


def test_bad_magic_word(tmp_path):
    rec, _ = _copy(tmp_path)
    with open(rec, "r+b") as f:
        f.seek(13980)                          # key 4
        f.write(b"\0\0\0\0")
    reader = RecordReader(rec)
    with pytest.raises(ValueError, match=r"key 4, byte offset 13980: bad magic word 0x00000000 "
                                         r"\(expected 0xced7230a\)"):
        reader.read(4)
    labels, problems = reader.scan_labels(np.array([7, 4]))
    assert labels[0] == 1.0 and np.isnan(labels[1]) and "bad magic word" in problems[1]


@pytest.mark.parametrize("name", SETS)
def test_offsets_of_many_keys_equal_offset_of_each(name):
    reader = _reader(name)
    keys = np.array(reader.keys[::-1] + reader.keys[:2])
    assert reader.offsets_of(keys).tolist() == [reader.offset(int(k)) for k in keys]
    assert reader.offsets_of(np.zeros(0, np.int64)).shape == (0,)
    with pytest.raises(KeyError, match=r"train\.idx: key 99 is not in the index"):
        reader.offsets_of(np.array([int(keys[0]), 99]))


def test_missing_key_and_stale_index(tmp_path):
    rec, idx = _copy(tmp_path)
    reader = RecordReader(rec)
    with pytest.raises(KeyError, match=r"train\.idx: key 99 is not in the index \(8 keys\)"):
        reader.read(99)
    with open(idx, "a") as f:
        f.write("99\t999999\n")                # indexed but beyond the end of the .rec
    with pytest.raises(ValueError, match=r"key 99, byte offset 999999: truncated file"):
        RecordReader(rec).read(99)


@pytest.mark.parametrize("line, what", [("3\tabc", "line 3 is malformed"),
                                        ("3", "line 3 is malformed"),
                                        ("-1\t0", "line 3 is malformed"),
                                        ("7\t100", r"key 7 appears twice \(lines 1 and 3\)")])
def test_malformed_idx(tmp_path, line, what):
    path = tmp_path / "x.idx"
    path.write_text(f"7\t0\n2\t8848\n{line}\n4\t13980\n")
    with pytest.raises(ValueError, match=what):
        read_idx(str(path))


def test_idx_fast_and_slow_paths_agree(tmp_path):
    path = tmp_path / "x.idx"
    path.write_text("5 10\n2\t20\n")             # space separated: still two fields per line
    keys, offsets = read_idx(str(path))
    assert keys.tolist() == [5, 2] and offsets.tolist() == [10, 20]


def test_writer_is_atomic_and_rejects_bad_keys(tmp_path):
    path = str(tmp_path / "a.rec")
    with pytest.raises(RuntimeError):
        with RecordWriter(path) as writer:
            writer.write(1, make_header(1.0), b"x")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []          # nothing left behind, nothing half-written
    with RecordWriter(path) as writer:
        writer.write(1, make_header(1.0), b"x")
        assert not os.path.exists(path)        # visible only after close
        with pytest.raises(ValueError, match="key 1 is negative or already written"):
            writer.write(1, make_header(1.0), b"y")
    assert sorted(os.listdir(tmp_path)) == ["a.idx", "a.rec"]
    with pytest.raises(ValueError, match="pack: header.flag=2 but 1 labels given"):
        pack(IRHeader(2, np.ones(1, np.float32), 0, 0), b"")


def test_file_replaced_after_first_open_is_refused_on_reopen(tmp_path):
    """A worker process reopens the .rec; if the file was regenerated meanwhile, it must fail
    loudly instead of reading the new file with the old index offsets."""
    import pickle
    rec, idx = str(tmp_path / "a.rec"), str(tmp_path / "a.idx")
    for payload in (b"first", b"second-version"):
        with RecordWriter(rec, idx) as w:
            w.write(0, make_header(1.0), payload)
        if payload == b"first":
            reader = RecordReader(rec, idx)
            assert reader.read(0)[1] == b"first"
    in_worker = pickle.loads(pickle.dumps(reader))   # what a DataLoader worker receives
    with pytest.raises(RuntimeError, match="a.rec was replaced or modified"):
        in_worker.read(0)
