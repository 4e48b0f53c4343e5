"""The dataset job end to end, in this process: manifest in, audio + metadata out, on a local Ray.

Every run uses the tiny checkpoint (random weights, so its "speech" is noise) with short rows; what is
checked is the product's contract: one metadata row per id, audio that decodes to the duration the
metadata states, errors that name their field, and nothing written outside the output prefix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from pipeline.dataset_job import run_dataset_job
from pipeline.manifest import ManifestRules
from pipeline.references import FetchPolicy
from tests.helpers import (
    REPO,
    assert_audio_matches_metadata,
    by_id,
    files_under,
    make_job,
    read_metadata,
    table_of,
    text_row,
    tmp_objects,
    voices_copy,
    write_jsonl,
    write_parquet,
)

SECRET = "hb-secret-7d41c0ffee"  # an S3 secret key that must never reach the output


# ---- object storage ---------------------------------------------------------------------------------


def test_s3_round_trip_writes_decodable_audio_metadata_and_a_redacted_config(
    ray_local, tiny_checkpoint, s3_server, s3_bucket, monkeypatch
) -> None:
    from hydra import compose, initialize_config_dir

    from jobs.generate_dataset import build_job

    options = {**s3_server.storage_options, "secret": SECRET}
    fs = fsspec.filesystem("s3", **options)
    rows = [text_row(i) for i in range(4)]
    buffer = io.BytesIO()
    pq.write_table(table_of(rows), buffer)
    fs.pipe_file(f"{s3_bucket}/inputs/manifest.parquet", buffer.getvalue())

    # The job as the CLI builds it: storage=s3 takes endpoint and credentials from the environment.
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            config_name="generate_dataset",
            overrides=[
                "storage=s3",
                f"manifest=s3://{s3_bucket}/inputs/manifest.parquet",
                f"output=s3://{s3_bucket}/run",
                f"model.source={tiny_checkpoint}",
                "model.device=cpu",
                "runtime.batch_size=2",
            ],
        )
    job = build_job(cfg)
    assert job.storage_options["secret"] == SECRET
    summary = run_dataset_job(job)

    root = f"{s3_bucket}/run"
    assert summary["output"] == f"s3://{root}"
    assert summary["this_run"]["by_status"] == {"ok": 4}
    metadata = by_id(read_metadata(fs, root))
    assert set(metadata) == {r["id"] for r in rows}
    for row in metadata.values():
        assert row["audio_uri"] == f"s3://{root}/{row['file_name']}"
        assert row["finish_reason"] in ("eos", "max_new_tokens")
        assert_audio_matches_metadata(fs, root, row)

    keys = {k[len(s3_bucket) + 1 :] for k in fs.find(s3_bucket)}
    assert {"run/summary.json", "run/config.yaml", "run/metadata.parquet"} <= keys
    assert json.loads(fs.cat_file(f"{root}/summary.json")) == summary
    config = fs.cat_file(f"{root}/config.yaml").decode()
    assert "secret: '***'" in config
    assert SECRET not in config
    assert pq.read_table(io.BytesIO(fs.cat_file(f"{root}/metadata.parquet"))).num_rows == 4
    # Nothing outside the output prefix but the manifest, and no in-flight objects left behind.
    assert {k for k in keys if not k.startswith("run/")} == {"inputs/manifest.parquet"}
    assert not [k for k in keys if k.startswith("run/_tmp/")]


# ---- bad rows ---------------------------------------------------------------------------------------


def test_invalid_rows_become_error_rows_naming_their_field_while_good_rows_finish(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    voices = voices_copy(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(voices / "en_man.wav", outside / "clip.wav")
    nan = float("nan")
    rows = [
        text_row(0),
        text_row(1, voice="belinda"),
        text_row(2, references=[{"audio": str(voices / "en_man.wav"), "transcript": "Hello there."}]),
        text_row(3, id="../escape"),
        text_row(4, id="empty-text", text=""),
        text_row(5, id="nan-temperature", temperature=nan),
        text_row(6, id="unknown-voice", voice="nobody"),
        text_row(
            7, id="outside-roots", references=[{"audio": str(outside / "clip.wav"), "transcript": "Hi."}]
        ),
        text_row(8, id="twice"),
        text_row(9, id="twice"),
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(table_of(rows), manifest)
    before = files_under(tmp_path)
    out = tmp_path / "out"

    summary = run_dataset_job(
        make_job(
            str(manifest),
            str(out),
            tiny_checkpoint,
            rules=ManifestRules(voice_library=str(voices)),
            fetch=FetchPolicy(allowed_roots=(str(voices),)),
        )
    )

    fs = fsspec.filesystem("file")
    metadata = by_id(read_metadata(fs, str(out)))
    expected_errors = {
        repr("../escape"): "id",
        "empty-text": "text",
        "nan-temperature": "temperature",
        "unknown-voice": "voice",
        "outside-roots": "references[0].audio",
        "twice": "id",
    }
    assert set(metadata) == {"row-0", "row-1", "row-2", *expected_errors}
    for good in ("row-0", "row-1", "row-2"):
        assert_audio_matches_metadata(fs, str(out), metadata[good])
    for row_id, field in expected_errors.items():
        row = metadata[row_id]
        assert row["status"] == "error"
        assert row["error_field"] == field
        assert row["error"].startswith(field), row["error"]
        assert row["file_name"] is None and row["audio_uri"] is None and row["duration_s"] is None
    assert "path separator" in metadata[repr("../escape")]["error"]
    assert "NaN" in metadata["nan-temperature"]["error"]
    assert "unknown voice 'nobody'" in metadata["unknown-voice"]["error"]
    assert "duplicate id at manifest rows [8, 9]" in metadata["twice"]["error"]

    audio = sorted(p.name for p in (out / "audio").iterdir())
    assert audio == ["row-0.wav", "row-1.wav", "row-2.wav"]
    assert summary["output_totals"]["by_status"] == {"ok": 3, "error": 6}
    assert summary["this_run"]["by_status"] == {"ok": 3, "error": 6}
    assert summary["audiofolder_rows"] == 3
    # The traversal id wrote nothing anywhere; every new file is under the output folder.
    assert all(out in p.parents for p in files_under(tmp_path) - before)
    assert not tmp_objects(fs, str(out))


# ---- configuration ----------------------------------------------------------------------------------


def dataset_job_of(tiny_checkpoint: str, tmp_path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from jobs.generate_dataset import build_job

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(text_row(0)) + "\n")
    base = [f"manifest={manifest}", f"output={tmp_path / 'out'}", f"model.source={tiny_checkpoint}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return build_job(compose(config_name="generate_dataset", overrides=[*base, *overrides]))


def configuration_error(tiny_checkpoint: str, tmp_path, setting: str) -> str:
    """The ConfigError message building the job with `setting` raises."""
    from jobs.common import ConfigError

    with pytest.raises(ConfigError) as err:
        dataset_job_of(tiny_checkpoint, tmp_path, setting)
    return str(err.value)


def test_batch_size_auto_lets_each_engine_size_its_batch_from_free_memory(tiny_checkpoint, tmp_path):
    from pipeline.dataset_job import AUTO_CALL_ROWS

    job = dataset_job_of(tiny_checkpoint, tmp_path, "runtime.batch_size=auto")
    assert job.engine.max_batch_size == 0  # model.engine.fitting_batch_size on a GPU, 16 rows on a CPU
    assert job.resources.call_rows == AUTO_CALL_ROWS


def test_the_cluster_runtime_sizes_each_engines_batch_from_free_memory(tiny_checkpoint, tmp_path):
    job = dataset_job_of(tiny_checkpoint, tmp_path, "runtime=cluster")
    assert job.engine.max_batch_size == 0 and job.resources.batch_size == 0


def test_vocoding_windows_follow_the_device_unless_the_config_sets_them(tiny_checkpoint, tmp_path):
    assert dataset_job_of(tiny_checkpoint, tmp_path).engine.vocode_windows is None  # on a GPU only
    job = dataset_job_of(tiny_checkpoint, tmp_path, "generation.engine.vocode_windows=false")
    assert job.engine.vocode_windows is False


def test_rows_are_vocoded_beside_the_decoding_unless_the_config_turns_it_off(tiny_checkpoint, tmp_path):
    assert dataset_job_of(tiny_checkpoint, tmp_path).engine.overlap_vocoding is True
    job = dataset_job_of(tiny_checkpoint, tmp_path, "generation.engine.overlap_vocoding=false")
    assert job.engine.overlap_vocoding is False


def test_refills_prefill_beside_the_decoding_only_when_the_config_turns_it_on(tiny_checkpoint, tmp_path):
    assert dataset_job_of(tiny_checkpoint, tmp_path).engine.overlap_prefill is False
    job = dataset_job_of(tiny_checkpoint, tmp_path, "generation.engine.overlap_prefill=true")
    assert job.engine.overlap_prefill is True


def test_a_gpu_synthesis_actor_takes_two_calls_at_once_and_a_cpu_actor_one(tiny_checkpoint, tmp_path):
    # The second call's reference clips are encoded beside the first's decoding (model.engine).
    gpu = dataset_job_of(tiny_checkpoint, tmp_path, "runtime=cluster").resources.synthesis_compute()
    assert (gpu.max_concurrent_calls_per_actor, gpu.enable_true_multi_threading) == (2, True)
    cpu = dataset_job_of(tiny_checkpoint, tmp_path).resources.synthesis_compute()
    assert (cpu.max_concurrent_calls_per_actor, cpu.enable_true_multi_threading) == (1, False)


def test_kv_slots_reserve_each_texts_estimated_length_unless_the_config_says_otherwise(
    tiny_checkpoint, tmp_path
):
    assert dataset_job_of(tiny_checkpoint, tmp_path).engine.reserve == "estimate"
    job = dataset_job_of(tiny_checkpoint, tmp_path, "generation.engine.reserve=max_new_tokens")
    assert job.engine.reserve == "max_new_tokens"
    assert dataset_job_of(tiny_checkpoint, tmp_path, "generation.engine.reserve=500").engine.reserve == 500


@pytest.mark.parametrize("value", ["0", "sometimes", "true"])
def test_a_reserve_neither_a_count_nor_a_known_policy_is_a_configuration_error(
    tiny_checkpoint, tmp_path, value
):
    from jobs.common import ConfigError

    with pytest.raises(ConfigError, match="generation.engine.reserve must be estimate, max_new_tokens or"):
        dataset_job_of(tiny_checkpoint, tmp_path, f"generation.engine.reserve={value}")


@pytest.mark.parametrize(
    "setting",
    [
        "generation.engine.static_cache=flase",
        "generation.engine.compile=1",
        "voices.allow_private_urls=yes",
    ],
)
def test_a_switch_set_to_anything_but_true_or_false_is_a_configuration_error(
    tiny_checkpoint, tmp_path, setting
):
    from jobs.common import ConfigError

    key, value = setting.split("=")
    with pytest.raises(ConfigError, match=f"{key}='?{value}'? must be true or false"):
        dataset_job_of(tiny_checkpoint, tmp_path, setting)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("generation.engine.reference_cache_size=abc", "reference_cache_size='abc' must be an integer"),
        ("generation.engine.max_reference_seconds=-5", "max_reference_seconds=-5 must be at least 0.5"),
        ("generation.max_text_chars=1.5", "generation.max_text_chars=1.5 must be an integer"),
        ("runtime.actors=0", "runtime.actors=0 must be at least 1"),
        ("runtime.gpus_per_actor=one", "runtime.gpus_per_actor='one' must be a number"),
        ("runtime.rows_per_call=0", "runtime.rows_per_call=0 must be at least 1"),
        ("voices.max_bytes=big", "voices.max_bytes='big' must be an integer"),
        ("runtime.num_cpus=two", "runtime.num_cpus='two' must be an integer"),
        ("model.dtype=float17", "model.dtype='float17' is not one of bfloat16, float16, float32, float64"),
        ("model.device=tpu", "model.device='tpu': use cpu, cuda, cuda:N, mps"),
    ],
)
def test_a_number_out_of_range_or_not_a_number_is_a_configuration_error(
    tiny_checkpoint, tmp_path, setting, message
):
    assert message in configuration_error(tiny_checkpoint, tmp_path, setting)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # Iterated as characters, this string's "/" used to allow every local file.
        (
            "voices.allowed_roots=examples/voices",
            "voices.allowed_roots='examples/voices' must be a list of folders",
        ),
        ("voices.allowed_roots=[examples/voices,'']", "must be a list of folder paths, none of them blank"),
    ],
)
def test_allowed_roots_that_are_not_a_list_of_folders_are_a_configuration_error(
    tiny_checkpoint, tmp_path, setting, message
):
    assert message in configuration_error(tiny_checkpoint, tmp_path, setting)


def test_allowed_roots_are_resolved_folders(tiny_checkpoint, tmp_path):
    job = dataset_job_of(tiny_checkpoint, tmp_path, f"voices.allowed_roots=[{tmp_path}]")
    assert job.fetch.allowed_roots == (str(tmp_path.resolve()),)


def test_vocode_windows_may_be_left_null_for_the_device_to_decide(tiny_checkpoint, tmp_path):
    from jobs.common import ConfigError

    assert dataset_job_of(tiny_checkpoint, tmp_path).engine.vocode_windows is None
    assert (
        dataset_job_of(
            tiny_checkpoint, tmp_path, "generation.engine.vocode_windows=false"
        ).engine.vocode_windows
        is False
    )
    with pytest.raises(ConfigError, match="vocode_windows='gpu' must be true, false or null"):
        dataset_job_of(tiny_checkpoint, tmp_path, "generation.engine.vocode_windows=gpu")


def test_int8_weights_are_taken_for_one_compiled_row_a_batch_and_refused_with_the_fix_otherwise(
    tiny_checkpoint, tmp_path
):
    from jobs.common import ConfigError

    one = ("generation.engine.int8_weights=true", "generation.engine.compile=true", "runtime.batch_size=1")
    assert dataset_job_of(tiny_checkpoint, tmp_path, *one).engine.int8_weights
    with pytest.raises(
        ConfigError, match="needs generation.engine.compile=true, static_cache=true and runtime"
    ):
        dataset_job_of(tiny_checkpoint, tmp_path, *one[:2])  # the local runtime's batch of 8


@pytest.mark.parametrize("value", ["0", "many", "true"])
def test_a_batch_size_neither_a_count_nor_auto_is_a_configuration_error(tiny_checkpoint, tmp_path, value):
    from jobs.common import ConfigError

    with pytest.raises(ConfigError, match="runtime.batch_size must be a count of rows, or auto"):
        dataset_job_of(tiny_checkpoint, tmp_path, f"runtime.batch_size={value}")


# ---- resume -----------------------------------------------------------------------------------------


def test_a_synthesis_call_takes_four_engine_batches_of_rows_by_default(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    # Slots of rows that finish early are refilled from the rest of the call: 8 rows at batch_size 2 go
    # through one call (one metadata part), not four calls that each drain to their longest row.
    manifest = tmp_path / "manifest.jsonl"
    rows = [text_row(i, max_new_tokens=20 + 15 * i) for i in range(8)]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"

    job = make_job(str(manifest), str(out), tiny_checkpoint, batch_size=2, rows_per_call=0)
    summary = run_dataset_job(job)
    assert summary["this_run"]["by_status"] == {"ok": 8}
    assert len(list((out / "metadata").iterdir())) == 1


def test_a_set_smaller_than_the_actors_calls_is_split_so_that_every_actor_gets_a_share():
    from pipeline.dataset_job import AUTO_CALL_ROWS, Resources

    eight = Resources(actors=8, batch_size=0)
    # A 1,088-row evaluation set: eight calls of 136 rows, not two of up to 1,024 for two of the actors.
    assert eight.layout(1088, 1088) == (136, 8)
    # Large manifests keep whole calls, in as many blocks.
    assert eight.layout(1_000_000, 1_000_000) == (AUTO_CALL_ROWS, 977)
    # A rerun: the rows left, shared out, over blocks of the whole manifest.
    assert eight.layout(1088, 100) == (13, 32)
    # One actor: calls of call_rows as before.
    assert Resources(actors=1, batch_size=2, rows_per_call=2).layout(12, 12) == (2, 4)


@dataclass(frozen=True)
class FinishedRun:
    manifest: Path
    out: Path
    summary: dict
    parts: list[Path]
    audio: dict[str, str]  # file name -> sha256


def audio_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "audio").iterdir()}


@pytest.fixture(scope="module")
def finished_run(ray_local, tiny_checkpoint, tmp_path_factory) -> FinishedRun:
    """One finished local run of four rows, shared by the tests of what reruns of it do: each rerun must
    leave its audio and metadata as they are, so the tests hold in any order."""
    folder = tmp_path_factory.mktemp("finished")
    manifest = write_jsonl(folder / "manifest.jsonl", [text_row(i) for i in range(4)])
    out = folder / "out"
    summary = run_dataset_job(make_job(str(manifest), str(out), tiny_checkpoint))
    return FinishedRun(manifest, out, summary, sorted((out / "metadata").iterdir()), audio_hashes(out))


def test_a_finished_local_run_leaves_no_working_folders_in_its_output(finished_run) -> None:
    assert sorted(p.name for p in finished_run.out.iterdir()) == [
        "audio",
        "metadata",
        "metadata.parquet",
        "summary.json",
    ]


def test_a_second_run_of_the_same_job_synthesizes_nothing_and_changes_no_audio(
    finished_run, tiny_checkpoint
) -> None:
    first, out = finished_run.summary, finished_run.out
    fs = fsspec.filesystem("file")
    assert first["this_run"]["by_status"] == {"ok": 4}
    assert first["this_run"]["audio_seconds"] > 0
    assert len(finished_run.audio) == 4

    second = run_dataset_job(make_job(str(finished_run.manifest), str(out), tiny_checkpoint))
    assert second["skipped_as_finished"] == 4
    assert second["this_run"]["rows"] == 0
    assert second["this_run"]["audio_seconds"] == 0
    assert second["output_totals"] == first["output_totals"]
    assert sorted((out / "metadata").iterdir()) == finished_run.parts
    assert audio_hashes(out) == finished_run.audio

    metadata = by_id(read_metadata(fs, str(out)))
    assert sorted(metadata) == [f"row-{i}" for i in range(4)]
    for row in metadata.values():
        assert_audio_matches_metadata(fs, str(out), row)
    assert json.loads((out / "summary.json").read_text())["run_id"] == second["run_id"]
    assert not tmp_objects(fs, str(out))


def test_a_rerun_of_a_finished_job_starts_no_synthesis_actor(finished_run, tmp_path) -> None:
    # An actor would fail to load this checkpoint and stop the run: finishing proves none started.
    job = make_job(str(finished_run.manifest), str(finished_run.out), str(tmp_path / "no-such-checkpoint"))
    second = run_dataset_job(job)

    assert second["this_run"]["rows"] == 0 and second["skipped_as_finished"] == 4
    assert second["output_totals"]["by_status"] == {"ok": 4}
    assert audio_hashes(finished_run.out) == finished_run.audio


def run_twice(manifest: Path, out: Path, checkpoint: str) -> tuple[dict, dict, dict[str, dict]]:
    """Two runs of one job into one output: their summaries, and the output's records by id."""
    first = run_dataset_job(make_job(str(manifest), str(out), checkpoint))
    second = run_dataset_job(make_job(str(manifest), str(out), checkpoint))
    return first, second, by_id(read_metadata(fsspec.filesystem("file"), str(out)))


def test_integer_ids_resume_and_are_checked_for_duplicates_as_the_ids_they_become(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    # CSV and Parquet readers infer integer ids; resume and the duplicate check once compared them with
    # the string ids written to the metadata, so every run synthesised them again and a duplicated 5 was
    # synthesised twice.
    manifest = write_parquet(
        tmp_path / "manifest.parquet",
        [{"id": 5, "text": "One."}, {"id": 5, "text": "Two."}, {"id": 6, "text": "Three."}],
    )
    out = tmp_path / "out"

    first, second, records = run_twice(manifest, out, tiny_checkpoint)

    assert {k: r["status"] for k, r in records.items()} == {"5": "error", "6": "ok"}
    assert "duplicate id at manifest rows [0, 1]" in records["5"]["error"]
    assert first["this_run"]["by_status"] == {"ok": 1, "error": 1}
    assert second["this_run"]["rows"] == 0


@pytest.fixture(scope="module")
def jsonl_runs(ray_local, tiny_checkpoint, tmp_path_factory) -> tuple[dict, dict, dict[str, dict], Path]:
    """Two runs of one JSONL manifest of lines that hold no row, change a field's type or carry an invalid
    id: the summaries, the records by id and the output. Arrow's JSON reader refused the whole manifest for
    any of the first kind; rows with invalid ids carry the id's repr in their records, which resume once
    never matched, so every rerun recorded them again."""
    lines = [
        json.dumps(text_row(0, topic="news")),
        '{"id": "row-1", "text": "Cut off',
        json.dumps(text_row(2, seed="abc")),  # seed was a number above: now a string
        json.dumps(text_row(3, mood="calm")),  # a field no other line has
        "[1, 2]",
        json.dumps(text_row(5, text="Caf\u00e9 au lait \u2028 on the terrace."), ensure_ascii=False),
    ]
    invalid_ids = [{"id": "a/b", "text": "Bad id."}, {"id": None, "text": "No id."}]
    manifest = tmp_path_factory.mktemp("jsonl") / "manifest.jsonl"
    manifest.write_bytes(
        "\n".join(lines).encode()
        + b'\n{"id": "row-6", "text": "caf\xe9"}\n'
        + "".join(json.dumps(row) + "\n" for row in invalid_ids).encode()
    )
    return *run_twice(manifest, manifest.parent / "out", tiny_checkpoint), manifest.parent / "out"


def test_rows_with_invalid_ids_are_recorded_once_and_skipped_by_a_rerun(jsonl_runs) -> None:
    _, second, records, _ = jsonl_runs

    # by_id would fail on an id recorded twice.
    assert {k: records[k]["status"] for k in ("'a/b'", "None")} == {"'a/b'": "error", "None": "error"}
    assert second["this_run"]["rows"] == 0 and second["skipped_as_finished"] == len(records)


def test_jsonl_lines_that_hold_no_row_or_change_a_fields_type_error_alone_and_are_not_recorded_again(
    jsonl_runs,
) -> None:
    first, second, records, out = jsonl_runs

    assert {k: r["status"] for k, r in records.items() if k.startswith(("row-", "line "))} == {
        "row-0": "ok",
        "line 2": "error",
        "row-2": "error",
        "row-3": "ok",
        "line 5": "error",
        "row-5": "ok",
        "line 7": "error",
    }
    assert records["line 2"]["error"] == (
        """line 2 (value '{"id": "row-1", "text": "Cut off'): invalid JSON at column 25: """
        "Unterminated string starting"
    )
    assert records["line 5"]["error"] == "line 5 (value '[1, 2]'): expected a JSON object, got list"
    assert records["line 7"]["error"].startswith(
        'line 7 (value \'{"id": "row-6", "text": "caf\ufffd"}\'): not UTF-8'
    )
    assert records["row-2"]["error_field"] == "seed"
    assert (records["row-0"]["topic"], records["row-3"]["mood"]) == ("news", "calm")
    # Every part has every passthrough column, as a table would give it, so the index keeps them all.
    index = pq.read_table(out / "metadata.parquet").to_pylist()
    assert {r["id"]: (r["topic"], r["mood"]) for r in index} == {
        "row-0": ("news", None),
        "row-3": (None, "calm"),
        "row-5": (None, None),
    }
    assert first["this_run"]["by_status"] == {"ok": 3, "error": 6}  # with the two invalid ids
    assert second["this_run"]["rows"] == 0 and second["skipped_as_finished"] == 9


@pytest.fixture(scope="module")
def csv_runs(ray_local, tiny_checkpoint, tmp_path_factory) -> tuple[dict, dict, dict[str, dict], Path]:
    """Two runs of one CSV manifest whose records Arrow's reader got wrong: the summaries, the records by id
    and the output. Arrow's CSV reader refused the whole file for the unquoted comma, read the whole text
    column as bytes for the Latin-1 cell (which errored every row), and read the ids 0001 and 1 both as the
    integer 1 (0001's audio was 1.wav, and the two were one id repeated)."""
    manifest = tmp_path_factory.mktemp("csv") / "manifest.csv"
    manifest.write_bytes(
        b"id,text,seed,max_new_tokens\n"
        b'row-0,"Quoted, as it should be.",0,30\n'
        b"row-1,Unquoted, which splits the text.,1,30\n"
        b"row-2,Caf\xe9 au lait.,2,30\n"
        b"row-3,Fine.,3,30\n"
        b"0001,Zero zero zero one.,4,30\n"
        b"1,2024,5,30\n"
    )
    return *run_twice(manifest, manifest.parent / "out", tiny_checkpoint), manifest.parent / "out"


def test_csv_records_that_do_not_match_the_header_or_are_not_utf8_error_alone_and_are_not_recorded_again(
    csv_runs,
) -> None:
    first, second, records, _ = csv_runs

    assert {k: records[k]["status"] for k in ("row-0", "line 3", "line 4", "row-3")} == {
        "row-0": "ok",
        "line 3": "error",
        "line 4": "error",
        "row-3": "ok",
    }
    assert records["line 3"]["error"] == (
        "line 3 (value 'row-1,Unquoted, which splits the text.,1,30'): 5 fields where the header has 4; "
        "quote a field that holds a comma"
    )
    assert (
        records["line 4"]["error"]
        == "line 4 (value 'row-2,Caf\ufffd au lait.,2,30'): not UTF-8; save the manifest as UTF-8"
    )
    assert records["row-0"]["seed"] == 0 and records["row-0"]["text"] == "Quoted, as it should be."
    assert first["this_run"]["by_status"] == {"ok": 4, "error": 2}
    assert second["this_run"]["rows"] == 0 and second["skipped_as_finished"] == 6


def test_csv_ids_that_look_like_numbers_keep_their_zeros_in_file_names(csv_runs) -> None:
    _, _, records, out = csv_runs

    assert {k: (records[k]["status"], records[k]["file_name"]) for k in ("0001", "1")} == {
        "0001": ("ok", "audio/0001.wav"),
        "1": ("ok", "audio/1.wav"),
    }
    assert records["1"]["text"] == "2024"
    assert {"0001.wav", "1.wav"} <= {p.name for p in (out / "audio").iterdir()}


def test_reference_clips_embedded_in_a_parquet_manifest_as_datasets_audio_values_clone_voices(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    # The layout 🤗 datasets gives an Audio column in Parquet: {bytes, path}. No allowed root is needed:
    # the manifest carries the clip itself.
    clip = (REPO / "examples" / "voices" / "belinda.wav").read_bytes()
    manifest = write_parquet(
        tmp_path / "manifest.parquet",
        [
            text_row(0, references=[{"audio": {"bytes": clip, "path": "belinda.wav"}, "transcript": "Hi."}]),
            text_row(
                1, references=[{"audio": {"bytes": b"not audio", "path": "x.wav"}, "transcript": "Hi."}]
            ),
        ],
    )
    out = tmp_path / "out"

    run_dataset_job(make_job(str(manifest), str(out), tiny_checkpoint, fetch=FetchPolicy(allowed_roots=())))

    records = by_id(read_metadata(fsspec.filesystem("file"), str(out)))
    assert (records["row-0"]["status"], records["row-1"]["status"]) == ("ok", "error")
    assert records["row-0"]["timings"]["reference_encode_s"] > 0
    assert (
        records["row-1"]["error"] == "references[0].audio: not a decodable audio file (wav, flac, mp3, ogg)"
    )


def test_a_folder_of_jsonl_files_gzipped_or_not_runs_every_file_and_names_a_bad_line_by_its_file(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    # As Spark writes JSON, with and without compression="gzip".
    folder = tmp_path / "manifest"
    folder.mkdir()
    parts = {
        "part-0.json": [text_row(0), text_row(1)],
        "part-1.json": [text_row(2)],
        "part-2.json.gz": [text_row(3)],
    }
    for name, rows in parts.items():
        lines = [json.dumps(row) for row in rows]
        text = ("\n".join([lines[0], "{cut", *lines[1:]]) + "\n").encode()
        (folder / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    (folder / "_SUCCESS").write_text("")
    out = tmp_path / "out"

    summary = run_dataset_job(make_job(str(folder), str(out), tiny_checkpoint))

    records = by_id(read_metadata(fsspec.filesystem("file"), str(out)))
    assert {k: r["status"] for k, r in records.items()} == {
        "row-0": "ok",
        "row-1": "ok",
        "row-2": "ok",
        "row-3": "ok",
        "part-0.json line 2": "error",
        "part-1.json line 2": "error",
        "part-2.json.gz line 2": "error",
    }
    assert records["part-1.json line 2"]["error"].startswith(
        "part-1.json line 2 (value '{cut'): invalid JSON"
    )
    assert summary["this_run"]["by_status"] == {"ok": 4, "error": 3}
