"""The dataset job's write stage stores a block's audio several rows at a time, each row's own, in order."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from model.requests import SynthesisResult
from pipeline.manifest import ManifestRules, validate_row
from pipeline.stages import WriteSettings, WriteStage, pack, unpack
from pipeline.storage import Storage


def synthesised(i: int) -> dict:
    row = validate_row({"id": f"row-{i}", "text": "Hi.", "speaker": i}, ManifestRules())
    waveform = np.full(2400 * (i + 1), 0.01 * (i + 1), np.float32)  # row i: (i + 1) / 10 s
    row["_result"] = SynthesisResult(id=row["id"], waveform=waveform, generated_frames=3 * (i + 1))
    return row


def test_rows_come_back_from_their_block_as_they_went_in_however_ray_slices_or_joins_blocks():
    rows = [synthesised(i) for i in range(6)]
    block = pack(rows)
    joined = pa.concat_tables([block.slice(4), pack([]), block.slice(1, 2)])  # two chunks, both offset
    for got, want in zip(unpack(joined), [rows[4], rows[5], rows[1], rows[2]], strict=True):
        assert got["id"] == want["id"] and got["speaker"] == want["speaker"]
        np.testing.assert_array_equal(got["_result"].waveform, want["_result"].waveform)
    assert unpack(block.slice(6)) == []


def test_rows_stored_at_once_keep_their_order_and_each_its_own_audio(s3_server, s3_bucket):
    output = f"s3://{s3_bucket}/run"
    stage = WriteStage(WriteSettings(output, s3_server.storage_options, checkpoint="ckpt", threads=4))

    out = stage(pack([synthesised(i) for i in range(8)]))

    assert out.column("id").to_pylist() == [f"row-{i}" for i in range(8)]
    assert out.column("duration_s").to_pylist() == [(i + 1) / 10 for i in range(8)]
    storage = Storage(output, s3_server.storage_options)
    [part] = storage.list("metadata")
    metadata = pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist()
    assert [(r["id"], r["speaker"], r["file_name"]) for r in metadata] == [
        (f"row-{i}", i, f"audio/row-{i}.wav") for i in range(8)
    ]
    for i in range(8):
        audio, rate = sf.read(io.BytesIO(storage.read_bytes(f"audio/row-{i}.wav")), dtype="float32")
        assert rate == 24000 and len(audio) == 2400 * (i + 1)
        assert np.allclose(audio, 0.01 * (i + 1), atol=1e-4)
