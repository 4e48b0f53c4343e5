"""Evaluation-set regeneration: Seed-TTS / EmergentTTS files in, scorer-ready audio (+ scores) out.

The end-to-end runs use the tiny checkpoint and tiny random scoring models on a local Ray (2 CPUs); the
"speech" is noise, which is enough to check ids, layouts, sample rates, error rows and the score plumbing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from model.checkpoint import CheckpointSpec
from model.engine import EngineOptions
from pipeline.dataset_job import DatasetJob, Resources
from pipeline.eval_job import INPUTS_KEY, EvalInputs, EvalJob, prepare_inputs, run_eval_job
from pipeline.eval_scoring import ScoringOptions, format_scores
from pipeline.manifest import ManifestRules, validate_row
from pipeline.references import FetchPolicy

REPO = Path(__file__).resolve().parents[1]
VOICES = REPO / "examples" / "voices"
EXAMPLES = REPO / "examples" / "eval"
# Whole CPUs for the 1-CPU tasks Ray Data adds (ListFiles, repartition): actors take under one of the two.
RESOURCES = Resources(actors=1, cpus_per_actor=0.5, batch_size=8, cpu_stage_workers=1, cpu_stage_cpus=0.1)

# Line numbers matter: they are what the error rows report.
BAD_META = (
    "a|Prompt a.|wavs/en_woman.wav|The first sentence to say.\n"  # 1
    "b|Prompt b.|../voices/en_man.wav|The second sentence to say.\n"  # 2
    "\n"  # 3
    "broken|only three fields\n"  # 4
    "a|Prompt again.|wavs/en_woman.wav|A duplicate utt.\n"  # 5
    "empty|Prompt.|wavs/en_woman.wav|   \n"  # 6
    "missing|Prompt.|wavs/nope.wav|This prompt does not exist.\n"  # 7
    "c|Prompt c.|wavs/en_woman.wav|The third sentence.\n"  # 8
)


def seed_set(root: Path) -> Path:
    """<root>/set/meta.lst with prompts in set/wavs/ and ../voices/, the way Seed-TTS Eval lays them out."""
    (root / "set" / "wavs").mkdir(parents=True)
    (root / "voices").mkdir()
    shutil.copy(VOICES / "en_woman.wav", root / "set" / "wavs" / "en_woman.wav")
    shutil.copy(VOICES / "en_man.wav", root / "voices" / "en_man.wav")
    meta = root / "set" / "meta.lst"
    meta.write_text(BAD_META, encoding="utf-8")
    return meta


def dataset(output: str, checkpoint: str, **kw) -> DatasetJob:
    return DatasetJob(
        manifest="",  # run_eval_job takes it from the inputs
        output=output,
        checkpoint=CheckpointSpec(source=checkpoint, device="cpu"),
        engine=EngineOptions(max_batch_size=8),
        rules=ManifestRules(voice_library=str(VOICES), defaults={"max_new_tokens": 30, "seed": 7}),
        resources=RESOURCES,
        **kw,
    )


def metadata(out: Path) -> list[dict]:
    rows = [
        r for part in sorted((out / "metadata").glob("*.parquet")) for r in pq.read_table(part).to_pylist()
    ]
    return sorted(rows, key=lambda r: r["line_number"])


@pytest.fixture(scope="module")
def scoring_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from pipeline.scoring import build_tiny_scoring_models

    return build_tiny_scoring_models(tmp_path_factory.mktemp("scorers"))


# ---- inputs (no Ray) ------------------------------------------------------------------------------


def test_prepare_seedtts_writes_a_manifest_with_labelled_bad_lines(tmp_path: Path) -> None:
    meta = seed_set(tmp_path)
    inputs = prepare_inputs("seedtts", str(meta), str(tmp_path / "out"), language="en")
    assert (inputs.rows, inputs.bad_lines, inputs.audio_key) == (7, 3, "{id}.{ext}")  # "missing" is fetched
    # The meta folder, and its parent because a prompt starts with ../
    assert inputs.allowed_roots == (str(tmp_path / "set"), str(tmp_path))
    rows = pq.read_table(tmp_path / "out" / INPUTS_KEY).to_pylist()
    assert inputs.manifest.endswith(INPUTS_KEY)
    # The second "a" would make the dataset job error both copies; '@' keeps the label out of valid ids.
    assert [r["id"] for r in rows] == ["a", "b", "broken", "a@line5", "empty", "missing", "c"]
    assert [r["line_number"] for r in rows] == [1, 2, 4, 5, 6, 7, 8]
    assert rows[1]["references"][0]["audio"] == str(tmp_path / "voices" / "en_man.wav")
    assert rows[3]["_error"] == "line 5: duplicate utt (first at line 1)"
    assert {r["language"] for r in rows} == {"en"}


def test_prepare_emergent_voice_file_and_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    meta = "examples/eval/emergent.jsonl"
    voice = {"audio": "examples/voices/en_man.wav", "transcript": "Hello."}
    inputs = prepare_inputs("emergent", meta, str(tmp_path / "o1"), voice=voice)
    rows = pq.read_table(tmp_path / "o1" / INPUTS_KEY).to_pylist()
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    # Workers do not share the driver's working directory, so the file becomes absolute and readable.
    assert {r["references"][0]["audio"] for r in rows} == {str(VOICES / "en_man.wav")}
    assert inputs.allowed_roots == (str(EXAMPLES), str(VOICES))

    prepare_inputs("emergent", meta, str(tmp_path / "o2"), voice="en_woman")
    rows = pq.read_table(tmp_path / "o2" / INPUTS_KEY).to_pylist()
    assert {r["voice"] for r in rows} == {"en_woman"} and all(r["references"] == [] for r in rows)
    assert [r["category"] for r in rows] == ["Emotions", "Emotions", "Questions"]


def test_prepare_manifest_passes_through_and_rejects_bad_arguments(tmp_path: Path) -> None:
    inputs = prepare_inputs("manifest", "s3://b/m.parquet", str(tmp_path))
    assert (inputs.manifest, inputs.audio_key, inputs.rows) == ("s3://b/m.parquet", "audio/{id}.{ext}", None)
    assert not (tmp_path / INPUTS_KEY).exists()
    with pytest.raises(ValueError, match="unknown eval_set"):
        prepare_inputs("librispeech", "x", str(tmp_path))
    with pytest.raises(ValueError, match="voice is only used"):
        prepare_inputs("seedtts", "x", str(tmp_path), voice="en_woman")
    (tmp_path / "empty.lst").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no lines"):
        prepare_inputs("seedtts", str(tmp_path / "empty.lst"), str(tmp_path / "o"))


def test_validate_row_honours_a_precomputed_error() -> None:
    row = {"id": "a@line5", "text": None, "line_number": 5, "_error": "line 5: bad", "_error_field": "utt"}
    out = validate_row(row, ManifestRules())
    assert (out["id"], out["status"], out["error"], out["error_field"]) == (
        "a@line5",
        "error",
        "line 5: bad",
        "utt",
    )
    assert out["line_number"] == 5 and "_error" not in out and "_error_field" not in out
    clean = validate_row({"id": "a", "text": "hi", "_error": None, "_error_field": None}, ManifestRules())
    assert clean["status"] == "pending" and "_error" not in clean


def test_format_scores() -> None:
    scores = {
        "count": 2,
        "wer": 0.5,
        "sim": None,
        "errors": 1,
        "groups": {"A": {"count": 2, "wer": 0.5, "sim": None, "errors": 1}},
    }
    lines = format_scores(scores).splitlines()
    assert lines[1].split() == ["all", "2", "0.5000", "-", "1"]
    assert lines[2].split()[0] == "A"


# ---- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seedtts_run(ray_local, tiny_checkpoint: str, tmp_path_factory) -> tuple[Path, Path, dict, EvalInputs]:
    """The seed set with bad lines, run once at 16 kHz into a local folder: (meta file, output, summary,
    inputs), shared by the tests of that run and of a rerun of it (which changes nothing)."""
    folder = tmp_path_factory.mktemp("seedtts")
    meta = seed_set(folder)
    out = folder / "out"
    inputs = prepare_inputs("seedtts", str(meta), str(out), language="en")
    # No configured roots: the prompts are readable only through the meta file's folders.
    job = EvalJob(dataset(str(out), tiny_checkpoint, fetch=FetchPolicy()), inputs, sample_rate=16000)
    return meta, out, run_eval_job(job), inputs


def test_seedtts_local_bad_lines_16k(seedtts_run) -> None:
    meta, out, summary, _ = seedtts_run

    assert summary["this_run"]["by_status"] == {"ok": 3, "error": 4}
    assert summary["eval"] == {
        "eval_set": "seedtts",
        "meta": str(meta),
        "rows": 7,
        "bad_lines": 3,
        "sample_rate": 16000,
    }
    rows = metadata(out)
    assert [(r["id"], r["status"], r["line_number"]) for r in rows] == [
        ("a", "ok", 1),
        ("b", "ok", 2),
        ("broken", "error", 4),
        ("a@line5", "error", 5),
        ("empty", "error", 6),
        ("missing", "error", 7),
        ("c", "ok", 8),
    ]
    errors = {r["id"]: (r["error_field"], r["error"]) for r in rows if r["status"] == "error"}
    assert errors["broken"] == ("line", "line 4: expected 4 or 5 '|'-separated fields, got 2")
    assert errors["a@line5"] == ("utt", "line 5: duplicate utt (first at line 1)")
    assert errors["empty"] == ("infer_text", "line 6: empty infer_text")
    assert errors["missing"][0] == "references[0].audio"
    # Scorer layout: <output>/<utt>.wav at the root, nothing for error rows, 16 kHz as configured.
    assert sorted(p.name for p in out.glob("*.wav")) == ["a.wav", "b.wav", "c.wav"]
    assert not (out / "audio").exists()
    for name in ("a", "b", "c"):
        info = sf.info(out / f"{name}.wav")
        assert info.samplerate == 16000 and info.frames > 0
    assert {r["sample_rate"] for r in rows if r["status"] == "ok"} == {16000}
    assert {r["file_name"] for r in rows if r["status"] == "ok"} == {"a.wav", "b.wav", "c.wav"}
    assert rows[0]["prompt_wav"] == "wavs/en_woman.wav"  # the adapter's columns stay in the metadata
    assert "scores" not in json.loads((out / "summary.json").read_text())


def test_a_rerun_of_a_finished_set_with_bad_lines_starts_no_synthesis_actor(
    seedtts_run, tmp_path: Path
) -> None:
    # The bad lines' records carry their ids as the adapter gave them ("a@line5", not a valid id); the
    # driver once compared the ids' reprs, took those lines for pending and started the actors for nothing.
    _, out, _, inputs = seedtts_run

    # An actor would fail to load this checkpoint and stop the run: finishing proves none started.
    never = str(tmp_path / "no-such-checkpoint")
    again = run_eval_job(EvalJob(dataset(str(out), never, fetch=FetchPolicy()), inputs, sample_rate=16000))

    assert again["this_run"]["rows"] == 0 and again["skipped_as_finished"] == 7


def test_seedtts_meta_on_s3(ray_local, tiny_checkpoint: str, s3_server, s3_bucket: str) -> None:
    client = s3_server.client()
    meta = "a|Prompt a.|wavs/en_woman.wav|First.\nb|Prompt b.|../voices/en_man.wav|Second.\nc|Prompt c.|wavs/en_woman.wav|Third.\n"
    client.put_object(Bucket=s3_bucket, Key="seed/en/meta.lst", Body=meta.encode())
    client.put_object(
        Bucket=s3_bucket, Key="seed/en/wavs/en_woman.wav", Body=(VOICES / "en_woman.wav").read_bytes()
    )
    client.put_object(
        Bucket=s3_bucket, Key="seed/voices/en_man.wav", Body=(VOICES / "en_man.wav").read_bytes()
    )
    options = s3_server.storage_options
    output = f"s3://{s3_bucket}/runs/r1"
    inputs = prepare_inputs("seedtts", f"s3://{s3_bucket}/seed/en/meta.lst", output, options)
    assert inputs.allowed_roots == ()  # remote prompts are fetched through storage, not local roots
    job = EvalJob(
        dataset(output, tiny_checkpoint, fetch=FetchPolicy(storage_options=options), storage_options=options),
        inputs,
    )
    summary = run_eval_job(job)

    assert summary["this_run"]["by_status"] == {"ok": 3}
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/r1/")["Contents"]}
    assert {"runs/r1/a.wav", "runs/r1/b.wav", "runs/r1/c.wav", f"runs/r1/{INPUTS_KEY}"} <= keys
    body = client.get_object(Bucket=s3_bucket, Key="runs/r1/b.wav")["Body"].read()
    assert sf.info(io.BytesIO(body)).samplerate == 24000  # the codec's rate unless configured


def test_emergent_scored(ray_local, tiny_checkpoint: str, scoring_models, tmp_path: Path) -> None:
    asr, sv = scoring_models
    out = tmp_path / "out"
    inputs = prepare_inputs("emergent", str(EXAMPLES / "emergent.jsonl"), str(out), voice="en_woman")
    scoring = ScoringOptions(enabled=True, asr_model=asr, sv_model=sv, cpus_per_actor=0.5, batch_size=2)
    job = EvalJob(
        dataset(str(out), tiny_checkpoint, fetch=FetchPolicy(allowed_roots=(str(VOICES),))),
        inputs,
        sample_rate=16000,
        scoring=scoring,
    )
    summary = run_eval_job(job)

    assert summary["this_run"]["by_status"] == {"ok": 3}
    assert sorted(p.name for p in out.glob("*.wav")) == ["0.wav", "1.wav", "2.wav"]
    assert sf.info(out / "2.wav").samplerate == 16000
    parts = sorted((out / "scores").glob("*.parquet"))
    scored = sorted((r for p in parts for r in pq.read_table(p).to_pylist()), key=lambda r: r["id"])
    assert [r["id"] for r in scored] == ["0", "1", "2"]
    assert [r["category"] for r in scored] == ["Emotions", "Emotions", "Questions"]
    assert all(r["error"] is None and isinstance(r["hypothesis"], str) for r in scored)
    assert all(r["wer"] >= 0 and -1 <= r["sim"] <= 1 for r in scored)

    scores = json.loads((out / "summary.json").read_text())["scores"]
    assert scores == summary["scores"]
    assert (scores["asr_model"], scores["sv_model"], scores["count"]) == (asr, sv, 3)
    assert scores["wer"] == pytest.approx(np.mean([r["wer"] for r in scored]))
    assert scores["sim"] == pytest.approx(np.mean([r["sim"] for r in scored]))
    emotions = [r for r in scored if r["category"] == "Emotions"]
    assert scores["groups"]["Emotions"]["count"] == 2
    assert scores["groups"]["Emotions"]["sim"] == pytest.approx(np.mean([r["sim"] for r in emotions]))
    assert scores["groups"]["Questions"]["wer"] == pytest.approx(scored[2]["wer"])
    # The dataset metadata is left as synthesis wrote it.
    assert "wer" not in pq.read_table(out / "metadata.parquet").column_names


def test_a_jsonl_manifests_lines_reach_scoring_row_by_row(ray_local, tmp_path: Path) -> None:
    import pyarrow as pa

    from pipeline.eval_scoring import InputSettings, ScoreInputStage
    from pipeline.json_lines import LINE, LINE_NUMBER
    from pipeline.stages import unpack
    from pipeline.storage import Storage

    out = Storage(str(tmp_path / "out"))
    for i in range(2):
        out.write_bytes(f"row-{i}.wav", f"audio of row {i}".encode())
    prompt = {"audio": str(VOICES / "en_woman.wav"), "transcript": "Hello."}
    lines = [json.dumps({"id": f"row-{i}", "text": f"Line {i}.", "references": [prompt]}) for i in range(3)]
    # eval_set=manifest hands a JSONL manifest on as its raw lines, as the dataset job reads one.
    batch = pa.table({LINE_NUMBER: [1, 2, 3, 4], LINE: [line.encode() for line in [*lines, "{not json"]]})
    settings = InputSettings(
        output=out.root,
        storage_options=None,
        rules=ManifestRules(),
        fetch=FetchPolicy(allowed_roots=(str(VOICES),)),
        ok_files=ray_local.put({"row-0": "row-0.wav", "row-1": "row-1.wav"}),  # row-2 was not synthesized
    )

    rows = unpack(ScoreInputStage(settings)(batch))

    assert [(r["id"], r["text"], r["audio"], r["error"]) for r in rows] == [
        ("row-0", "Line 0.", b"audio of row 0", None),
        ("row-1", "Line 1.", b"audio of row 1", None),
    ]
    assert all(r["reference_audio"] is not None for r in rows)


# ---- the CLI ------------------------------------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="regenerate_eval", overrides=list(overrides))


def test_the_default_config_builds_a_job(
    monkeypatch, tiny_checkpoint: str, scoring_models, tmp_path: Path
) -> None:
    from jobs.regenerate_eval import build_eval_job

    monkeypatch.chdir(REPO)
    job = build_eval_job(
        _compose(f"model.source={tiny_checkpoint}", f"output={tmp_path}", "generation.seed=5")
    )
    assert (job.inputs.eval_set, job.inputs.rows, job.sample_rate) == ("seedtts", 3, 24000)
    # examples/eval/meta.lst points at ../voices, so its parent folder is readable too.
    assert job.inputs.allowed_roots == (str(EXAMPLES), str(EXAMPLES.parent))
    assert job.dataset.manifest == job.inputs.manifest and job.dataset.rules.defaults["seed"] == 5
    assert not job.scoring.enabled and job.scoring.gpus_per_actor == 0  # follows runtime.gpus_per_actor

    voice = "voice={audio: examples/voices/en_man.wav, transcript: Hello.}"
    job = build_eval_job(
        _compose(
            f"model.source={tiny_checkpoint}",
            f"output={tmp_path / 'e'}",
            "eval_set=emergent",
            "meta=examples/eval/emergent.jsonl",
            voice,
            "scoring.enabled=true",
            f"scoring.asr_model={scoring_models[0]}",
            f"scoring.sv_model={scoring_models[1]}",
        )
    )
    rows = pq.read_table(tmp_path / "e" / INPUTS_KEY).to_pylist()
    assert {r["references"][0]["audio"] for r in rows} == {str(VOICES / "en_man.wav")}
    assert job.scoring.enabled and job.scoring.asr_model == scoring_models[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval_set=librispeech", "eval_set='librispeech'"),
        ("sample_rate=8000", "sample_rate=8000"),
        ("voice=en_woman", "voice is only used with eval_set=emergent"),
        ("generation.response_format=flac", "writes wav"),
        ("meta=examples/eval/missing.lst", "meta='examples/eval/missing.lst'"),
        ("+voice.audio=examples/voices/none.wav", "voice.audio='examples/voices/none.wav' is not a file"),
        ("scoring.actors=0", "scoring.actors"),
        # Offline and not cached: found before synthesis, not after it when the scorers load.
        ("scoring.enabled=true", "scoring.asr_model='openai/whisper-large-v3' cannot be loaded"),
    ],
)
def test_bad_config_fails_fast(monkeypatch, tmp_path: Path, override: str, message: str) -> None:
    from jobs.common import ConfigError
    from jobs.regenerate_eval import build_eval_job

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="configuration error") as err:
        build_eval_job(_compose(f"output={tmp_path}", override))
    assert err.value.code == 2
    assert message in str(err.value)


def test_the_cli_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "jobs.regenerate_eval", "eval_set=librispeech", f"output={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error: eval_set='librispeech'" in proc.stderr
