"""app/db/tables.py: the byte layout of stored sequences and example records, as documented
(little-endian, packed), read back by the server's reader."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from app.db.queries import decode_tokens
from app.db.tables import (
    EXAMPLE_HEAD,
    SEQUENCE_TOKENS,
    StoredExample,
    example_record,
    unpack_examples,
)


def test_an_example_record_is_its_head_then_the_window_as_float16():
    assert EXAMPLE_HEAD.itemsize == 12
    assert example_record(5).itemsize == 12 + 2 * 5
    acts = [0.5, -2.0, 65504.0, 2.0**-24, 0.0]
    records = [(7, 3, 9, 1.0000001), (2**31 - 1, -1, 32767, -3.5)]
    data = b"".join(struct.pack("<ihhf5e", *head, *acts) for head in records)
    got = unpack_examples(4, 2, 5, data)
    want_acts = struct.pack("<5e", *acts)
    as_f32 = struct.unpack("<f", struct.pack("<f", 1.0000001))[0]
    assert got == [StoredExample(4, 0, 7, 3, 9, as_f32, want_acts),
                   StoredExample(4, 1, 2**31 - 1, -1, 32767, -3.5, want_acts)]
    # plain Python numbers, as the pages and the JSON take them
    assert all(type(v) is int for e in got for v in e[:5])
    assert all(type(e.peak_value) is float for e in got)
    rec = np.frombuffer(data, dtype=example_record(5))  # the writer's view of the same bytes
    assert rec["seq_idx"].tolist() == [7, 2**31 - 1] and rec["acts"][1].tobytes() == want_acts


def test_a_block_of_the_wrong_length_or_window_is_refused():
    with pytest.raises(ValueError, match="2 records of 22 bytes holds 43 bytes"):
        unpack_examples(0, 2, 5, bytes(43))
    with pytest.raises(ValueError, match="at least one token"):
        example_record(0)
    assert unpack_examples(0, 0, 5, b"") == []


def test_sequence_tokens_are_little_endian_int32():
    ids = [0, 1, 50256, 2**31 - 1, 7]
    blob = np.array(ids, dtype=SEQUENCE_TOKENS).tobytes()
    assert blob == struct.pack("<5i", *ids)
    assert decode_tokens(blob, 1, 3) == ids[1:4]
