"""The dataset job's fetch stage decodes each reference clip ahead of the synthesis actors the first time it
meets it; they get the waveform (and so the codes) they would have decoded themselves."""

import numpy as np
import torch

from model.reference_audio import content_hash, decode_reference
from model.requests import DecodedClip, EncodedClip, Reference
from pipeline.manifest import ManifestRules, to_request, validate_row
from pipeline.references import FetchPolicy
from pipeline.stages import FetchStage, pack, unpack
from tests.helpers import REPO, serve_audio, text_row, voices_copy

BELINDA = REPO / "examples" / "voices" / "belinda.wav"  # 44.1 kHz
RULES = ManifestRules()


def fetch(tmp_path, rows_refs: list[list[dict]], extra: dict[str, bytes] | None = None) -> list[dict]:
    voices = voices_copy(tmp_path)
    for name, data in (extra or {}).items():
        (voices / name).write_bytes(data)
    rules = ManifestRules(voice_library=str(voices))
    rows = [
        validate_row(text_row(i, references=[{**r, "audio": str(voices / r["audio"])} for r in refs]), rules)
        for i, refs in enumerate(rows_refs)
    ]
    stage = FetchStage(FetchPolicy(allowed_roots=(str(voices),)), max_seconds=60.0)
    return unpack(stage(pack(rows)))


def test_a_44_1_khz_reference_arrives_decoded_at_the_codec_rate(tmp_path):
    [out] = fetch(tmp_path, [[{"audio": "belinda.wav", "transcript": "Hi."}]])
    [clip] = out["_audio"]
    assert isinstance(clip, DecodedClip) and clip.sample_rate == 24000
    np.testing.assert_array_equal(clip.samples, decode_reference(BELINDA.read_bytes(), 24000))
    assert clip.source_hash == content_hash(BELINDA.read_bytes())


def test_a_clip_met_again_travels_as_its_file_and_its_hash_not_decoded_again(tmp_path):
    ref = {"audio": "belinda.wav", "transcript": "Hi."}
    first, second, third = fetch(tmp_path, [[ref], [ref], [ref]])
    assert isinstance(first["_audio"][0], DecodedClip)
    data = BELINDA.read_bytes()
    assert second["_audio"][0] == third["_audio"][0] == EncodedClip(data, content_hash(data))


def test_a_clip_met_again_becomes_a_reference_keyed_by_its_hash_so_the_file_is_not_hashed_again(tmp_path):
    ref = {"audio": "belinda.wav", "transcript": "Hi."}
    _, second = fetch(tmp_path, [[ref], [ref]])
    [reference] = to_request(second, second.pop("_audio")).references
    data = BELINDA.read_bytes()
    assert reference.audio == data and reference.cache_key == content_hash(data)


def test_a_reference_that_does_not_decode_errors_its_row_naming_the_reference(tmp_path):
    refs = [{"audio": "en_man.wav", "transcript": "A."}, {"audio": "noise.wav", "transcript": "B."}]
    [out] = fetch(tmp_path, [refs], extra={"noise.wav": b"RIFF but not audio"})
    assert out["status"] == "error" and out["error_field"] == "references[1].audio"
    assert out["error"].startswith("references[1].audio: not a decodable audio file")


def test_a_decoded_clip_gets_its_files_codes_and_the_file_then_hits_the_cache(engine):
    from model.engine import EngineOptions, SynthesisEngine

    fresh = SynthesisEngine(engine.checkpoint, EngineOptions())
    data = BELINDA.read_bytes()
    clip = DecodedClip(decode_reference(data, 24000), 24000, content_hash(data))
    from_clip = fresh.encode_reference(
        Reference(
            audio=clip.samples, sample_rate=clip.sample_rate, cache_key=clip.source_hash, transcript="Hi."
        )
    )
    hits = fresh.reference_cache.hits
    assert torch.equal(fresh.encode_reference(Reference(audio=data, transcript="Hi.")), from_clip)
    assert fresh.reference_cache.hits == hits + 1
    assert torch.equal(from_clip, engine.encode_reference(Reference(audio=data, transcript="Hi.")))


def fetch_urls(rows_urls: list[list[str]], server, threads: int = 16) -> list[dict]:
    rows = [
        validate_row(
            text_row(i, references=[{"audio": server.url(u), "transcript": "Hi."} for u in urls]), RULES
        )
        for i, urls in enumerate(rows_urls)
    ]
    stage = FetchStage(FetchPolicy(allow_private_urls=True), max_seconds=60.0, threads=threads)
    return unpack(stage(pack(rows)))


def test_a_blocks_distinct_sources_are_read_at_once():
    urls = [f"/together/clip-{i}.wav" for i in range(4)]
    files = {f"/clip-{i}.wav": BELINDA.read_bytes() for i in range(4)}
    with serve_audio(files, together=4) as server:
        out = fetch_urls([[u] for u in urls], server, threads=4)
    assert [r["status"] for r in out] == ["pending"] * 4
    assert sorted(server.paths) == urls


def test_a_source_several_rows_of_a_block_name_is_read_once():
    with serve_audio({"/belinda.wav": BELINDA.read_bytes()}) as server:
        first, second, third = fetch_urls([["/belinda.wav"]] * 3, server)
    assert server.paths == ["/belinda.wav"]
    assert isinstance(first["_audio"][0], DecodedClip)
    data = BELINDA.read_bytes()
    assert second["_audio"][0] == third["_audio"][0] == EncodedClip(data, content_hash(data))


def test_a_source_that_cannot_be_read_errors_each_row_naming_it_where_that_row_does():
    with serve_audio({"/belinda.wav": BELINDA.read_bytes()}) as server:
        both, alone, fine = fetch_urls(
            [["/belinda.wav", "/gone.wav"], ["/gone.wav"], ["/belinda.wav"]], server
        )
    assert (both["status"], both["error_field"]) == ("error", "references[1].audio")
    assert (alone["status"], alone["error_field"]) == ("error", "references[0].audio")
    assert both["error"].endswith("answered HTTP 404") and alone["error"].endswith("answered HTTP 404")
    assert fine["status"] == "pending" and server.paths.count("/gone.wav") == 1
