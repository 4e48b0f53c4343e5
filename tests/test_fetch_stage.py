"""The dataset job's fetch stage decodes reference clips ahead of the synthesis actors, which then get the
waveform (and so the codes) they would have decoded themselves."""

import numpy as np
import torch

from model.reference_audio import decode_reference
from model.requests import DecodedClip, Reference
from pipeline.manifest import ManifestRules, validate_row
from pipeline.references import FetchPolicy
from pipeline.stages import FetchStage, pack, unpack
from tests.helpers import REPO, text_row, voices_copy


def fetch(tmp_path, references: list[dict], extra: dict[str, bytes] | None = None) -> dict:
    voices = voices_copy(tmp_path)
    for name, data in (extra or {}).items():
        (voices / name).write_bytes(data)
    refs = [{**ref, "audio": str(voices / ref["audio"])} for ref in references]
    row = validate_row(text_row(0, references=refs), ManifestRules(voice_library=str(voices)))
    stage = FetchStage(FetchPolicy(allowed_roots=(str(voices),)), max_seconds=60.0)
    [out] = unpack(stage(pack([row])))
    return out


def test_a_44_1_khz_reference_arrives_decoded_at_the_codec_rate(tmp_path):
    out = fetch(tmp_path, [{"audio": "belinda.wav", "transcript": "Hi."}])
    [clip] = out["_audio"]
    assert isinstance(clip, DecodedClip) and clip.sample_rate == 24000
    expected = decode_reference((REPO / "examples" / "voices" / "belinda.wav").read_bytes(), 24000)
    np.testing.assert_array_equal(clip.samples, expected)


def test_a_reference_that_does_not_decode_errors_its_row_naming_the_reference(tmp_path):
    refs = [{"audio": "en_man.wav", "transcript": "A."}, {"audio": "noise.wav", "transcript": "B."}]
    out = fetch(tmp_path, refs, extra={"noise.wav": b"RIFF but not audio"})
    assert out["status"] == "error" and out["error_field"] == "references[1].audio"
    assert out["error"].startswith("references[1].audio: not a decodable audio file")


def test_the_engine_encodes_a_decoded_clip_to_the_codes_of_its_file(engine):
    data = (REPO / "examples" / "voices" / "belinda.wav").read_bytes()
    clip = DecodedClip(decode_reference(data, 24000), 24000)
    from_file = engine.encode_reference(Reference(audio=data, transcript="Hi."))
    from_clip = engine.encode_reference(
        Reference(audio=clip.samples, sample_rate=clip.sample_rate, transcript="Hi.")
    )
    assert torch.equal(from_file, from_clip)
