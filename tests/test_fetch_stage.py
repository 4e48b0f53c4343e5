"""The dataset job's fetch stage decodes each reference clip ahead of the synthesis actors the first time it
meets it; they get the waveform (and so the codes) they would have decoded themselves. Later rows with the
clip carry only its hash, which a synthesis actor resolves from its cache or by reading the clip again."""

import numpy as np
import torch

from model.reference_audio import content_hash, decode_reference
from model.requests import DecodedClip, KnownClip, Reference
from pipeline.manifest import ManifestRules, validate_row
from pipeline.references import FetchPolicy
from pipeline.stages import FetchStage, SynthesisSettings, SynthesizeStage, pack, unpack
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
    return unpack(FetchStage(policy(tmp_path), max_seconds=60.0)(pack(rows)))


def policy(tmp_path) -> FetchPolicy:
    return FetchPolicy(allowed_roots=(str(tmp_path / "voices"),))


def test_a_44_1_khz_reference_arrives_decoded_at_the_codec_rate(tmp_path):
    [out] = fetch(tmp_path, [[{"audio": "belinda.wav", "transcript": "Hi."}]])
    [clip] = out["_audio"]
    assert isinstance(clip, DecodedClip) and clip.sample_rate == 24000
    np.testing.assert_array_equal(clip.samples, decode_reference(BELINDA.read_bytes(), 24000))
    assert clip.source_hash == content_hash(BELINDA.read_bytes())


def test_a_clip_met_again_travels_as_its_hash_alone_not_its_file(tmp_path):
    ref = {"audio": "belinda.wav", "transcript": "Hi."}
    first, second, third = fetch(tmp_path, [[ref], [ref], [ref]])
    assert isinstance(first["_audio"][0], DecodedClip)
    assert second["_audio"][0] == third["_audio"][0] == KnownClip(content_hash(BELINDA.read_bytes()))
    assert len(pack([third]).column("payload")[0].as_py()) < 2_000  # the file: 896,776 bytes


def synthesis_stage(tiny_checkpoint: str, tmp_path) -> SynthesizeStage:
    from model.checkpoint import CheckpointSpec
    from model.engine import EngineOptions

    # float64: rows voiced in different batches keep the same codes (see the engine64 fixture).
    spec = CheckpointSpec(source=tiny_checkpoint, device="cpu", dtype="float64")
    return SynthesizeStage(SynthesisSettings(spec, EngineOptions(max_batch_size=4), fetch=policy(tmp_path)))


def codes_of(rows: list[dict]) -> list:
    assert all(r["status"] == "pending" and r["_result"].ok for r in rows), [r.get("error") for r in rows]
    return [r["_result"].audio_codes for r in rows]


def test_rows_carrying_a_clips_hash_are_voiced_from_the_actors_cache_or_read_the_clip_again(
    tiny_checkpoint, tmp_path
):
    ref = {"audio": "belinda.wav", "transcript": "Hi."}
    rows = fetch(tmp_path, [[ref]] * 4)  # one decoded clip, three hashes
    clip = tmp_path / "voices" / "belinda.wav"
    data = clip.read_bytes()
    clip.unlink()  # nothing below may read it again, until it is back
    met = synthesis_stage(tiny_checkpoint, tmp_path)
    voiced = codes_of(unpack(met(pack(rows[:2]))))  # the hash's row: the clip its batch mate brought
    voiced += codes_of(unpack(met(pack(rows[2:]))))  # the actor's cache

    fresh = synthesis_stage(tiny_checkpoint, tmp_path)  # an actor that never met the clip
    [gone] = unpack(fresh(pack(rows[3:])))
    assert (gone["status"], gone["error_field"]) == ("error", "references[0].audio")
    clip.write_bytes(data)
    for a, b in zip(codes_of(unpack(fresh(pack(rows[2:])))), voiced[2:], strict=True):
        np.testing.assert_array_equal(a, b)


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
    assert second["_audio"][0] == third["_audio"][0] == KnownClip(content_hash(BELINDA.read_bytes()))


def test_a_source_that_cannot_be_read_errors_each_row_naming_it_where_that_row_does():
    with serve_audio({"/belinda.wav": BELINDA.read_bytes()}) as server:
        both, alone, fine = fetch_urls(
            [["/belinda.wav", "/gone.wav"], ["/gone.wav"], ["/belinda.wav"]], server
        )
    assert (both["status"], both["error_field"]) == ("error", "references[1].audio")
    assert (alone["status"], alone["error_field"]) == ("error", "references[0].audio")
    assert both["error"].endswith("answered HTTP 404") and alone["error"].endswith("answered HTTP 404")
    assert fine["status"] == "pending" and server.paths.count("/gone.wav") == 1


def test_a_row_carrying_a_clips_hash_takes_the_clip_from_a_later_row_of_its_call(tiny_checkpoint, tmp_path):
    # Blocks from the fetch actors reach a synthesis call in any order.
    ref = {"audio": "belinda.wav", "transcript": "Hi."}
    decoded, known = fetch(tmp_path, [[ref], [ref]])
    (tmp_path / "voices" / "belinda.wav").unlink()  # reading it again would fail the row
    first, second = unpack(synthesis_stage(tiny_checkpoint, tmp_path)(pack([known, decoded])))
    assert codes_of([first, second])


def test_a_clip_that_changed_since_the_fetch_stage_read_it_errors_the_row_that_reads_it_again(
    tiny_checkpoint, tmp_path
):
    ref = {"audio": "belinda.wav", "transcript": "Hi."}
    _, known = fetch(tmp_path, [[ref], [ref]])
    (tmp_path / "voices" / "en_man.wav").replace(tmp_path / "voices" / "belinda.wav")
    [row] = unpack(synthesis_stage(tiny_checkpoint, tmp_path)(pack([known])))  # an actor that never met it
    assert (row["status"], row["error_field"]) == ("error", "references[0].audio")
    assert "changed after this run first read it" in row["error"] and "retry_errors=true" in row["error"]
