"""Offline filtering: every column kept, every row scored once, outputs that load back, refusals, selection."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, load_dataset, load_from_disk
from filtering_setup import TARGET_ROWS, pool_rows, write_jsonl, write_workspace

from hfinfluence.config import InfluenceConfig
from hfinfluence.errors import ConfigError, ConfigMismatchError, EmptyInputError, OutputFolderError, PushToHubError
from hfinfluence.filtering import (
    FilterJob,
    ReadSpec,
    RunFolder,
    SelectSpec,
    SourceSpec,
    merge_shards,
    rank_scores,
    run_job,
    select_rows,
    size_report,
    write_shard,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer, a 37-row pool and a 6-row target, shared by this module's tests."""
    return write_workspace(tmp_path_factory.mktemp("filtering"))


def make_job(workspace: Path, output: Path, **overrides) -> FilterJob:
    settings = dict(
        command="filter",
        output=output,
        candidates=SourceSpec(str(workspace / "pool.jsonl")),
        target=SourceSpec(str(workspace / "target.jsonl")),
        read=ReadSpec(max_length=24),
        influence=InfluenceConfig(),
        select=SelectSpec(keep_ratio=0.25),
        model=str(workspace / "model"),
        model_dtype="float64",
        fit_rows=None,
        batch_size=3,
        shard_size=5,
        id_field="id",
        group_field="source",
    )
    settings.update(overrides)
    return FilterJob(**settings)


@pytest.fixture(scope="module")
def parquet_run(workspace) -> Path:
    out = workspace / "run-parquet"
    run_job(make_job(workspace, out))
    return out


def test_kept_rows_keep_every_original_column_and_gain_score_and_rank(workspace, parquet_run):
    pool = {row["id"]: row for row in pool_rows(37)}
    kept = load_dataset("parquet", data_files=str(parquet_run / "kept.parquet"), split="train")
    scores = pq.read_table(parquet_run / "scores.parquet").to_pylist()

    assert kept.column_names == [*pool_rows(1)[0], "influence_score", "influence_rank"]
    assert len(kept) == round(37 * 0.25)
    for row in kept:
        original = pool[row["id"]]
        assert {k: row[k] for k in original} == original
        entry = scores[int(row["id"].split("-")[1])]
        assert (row["influence_score"], row["influence_rank"]) == (entry["score"], entry["rank"])
    assert sorted(row["influence_rank"] for row in kept) == list(range(1, len(kept) + 1))
    assert [row["id"] for row in kept] == sorted(row["id"] for row in kept)  # original row order


def test_scores_file_covers_every_row_once_with_ranks_and_groups(parquet_run):
    table = pq.read_table(parquet_run / "scores.parquet")
    assert table.column_names == ["row", "id", "group", "score", "rank", "truncated", "loss_tokens"]
    rows = table.to_pylist()
    assert [r["row"] for r in rows] == list(range(37))
    assert [r["id"] for r in rows] == [f"row-{i:03d}" for i in range(37)]
    assert sorted(r["rank"] for r in rows) == list(range(1, 38))
    by_rank = sorted(rows, key=lambda r: r["rank"])
    assert all(a["score"] >= b["score"] for a, b in zip(by_rank, by_rank[1:], strict=False))
    manifest = json.loads((parquet_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_rows"] == 37
    assert not (parquet_run / "shards").exists()


def test_report_has_the_command_groups_examples_sizing_and_histogram(parquet_run):
    report = (parquet_run / "report.md").read_text()
    for heading in ("## Summary", "## Counts per `source`", "## Highest-scored rows", "## Lowest-scored rows"):
        assert heading in report
    assert "## Curvature and sketches" in report and "memory plan" in report and "model.layers.0.mlp.up_proj" in report
    assert "## Leakage diagnostic" in report
    check = json.loads((parquet_run / "manifest.json").read_text())["info"]["seed_check"]
    assert 2 <= check["examples"] <= 37 and -1 <= check["spearman"] <= 1 and check["spread"] >= 0
    assert f"Seed check: the first {check['examples']} scored candidates" in report
    assert "| animals | 13 |" in report and "| math | 24 |" in report
    assert (parquet_run / "score_histogram.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("output_format", ["jsonl", "arrow"])
def test_other_formats_load_back_equal_and_reuse_the_scores(workspace, parquet_run, tmp_path, output_format):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("manifest.json", "scores.parquet", "kept.parquet"):
        (out / name).write_bytes((parquet_run / name).read_bytes())
    summary = run_job(make_job(workspace, out, output_format=output_format, overwrite=True))

    assert "fit" not in summary.times and "score" not in summary.times  # the scores were reused
    reference = load_dataset("parquet", data_files=str(parquet_run / "kept.parquet"), split="train")
    if output_format == "jsonl":
        loaded = load_dataset("json", data_files=str(out / "kept.jsonl"), split="train")
    else:
        loaded = load_from_disk(str(out / "kept"))
    assert loaded.to_list() == reference.to_list()
    assert not (out / "kept.parquet").exists()


def test_scores_do_not_depend_on_batch_size_shard_size_or_streaming(workspace, parquet_run, tmp_path):
    job = make_job(workspace, tmp_path / "other", batch_size=7, shard_size=16, streaming=True)
    run_job(job)
    ours = pq.read_table(tmp_path / "other" / "scores.parquet")
    reference = pq.read_table(parquet_run / "scores.parquet")
    np.testing.assert_allclose(ours.column("score").to_numpy(), reference.column("score").to_numpy(), rtol=1e-9)
    assert_same_ranks_up_to_ties(ours, reference)
    pool = {row["id"]: row for row in pool_rows(37)}
    kept = load_dataset("parquet", data_files=str(tmp_path / "other" / "kept.parquet"), split="train")
    assert len(kept) == 9 and all({k: row[k] for k in pool[row["id"]]} == pool[row["id"]] for row in kept)
    expected = load_dataset("parquet", data_files=str(parquet_run / "kept.parquet"), split="train")
    np.testing.assert_allclose(sorted(kept["influence_score"]), sorted(expected["influence_score"]), rtol=1e-9)


def assert_same_ranks_up_to_ties(ours: pa.Table, reference: pa.Table, rtol: float = 1e-9) -> None:
    """Equal ranks, except among rows whose scores tie within round-off (duplicate rows), which may swap."""
    scores = reference.column("score").to_numpy()
    ranks, other = np.array(reference.column("rank").to_pylist()), np.array(ours.column("rank").to_pylist())
    for row, score in enumerate(scores):
        tied = np.flatnonzero(np.abs(scores - score) <= rtol * np.abs(score))
        assert ranks[tied].min() <= other[row] <= ranks[tied].max()


def test_rerun_with_other_settings_is_refused_with_both_shown(workspace, parquet_run):
    with pytest.raises(ConfigMismatchError) as error:
        run_job(make_job(workspace, parquet_run, read=ReadSpec(max_length=20)))
    assert "read.max_length: saved 24, now 20" in str(error.value)
    with pytest.raises(ConfigMismatchError, match='command: saved "filter", now "score"'):
        run_job(make_job(workspace, parquet_run, command="score", select=None))


def test_overwrite_with_new_scoring_settings_starts_over(workspace, tmp_path):
    out = tmp_path / "run"
    run_job(make_job(workspace, out, fit_rows=12))
    before = pq.read_table(out / "scores.parquet").column("score").to_numpy()
    summary = run_job(make_job(workspace, out, fit_rows=20, overwrite=True))
    after = pq.read_table(out / "scores.parquet").column("score").to_numpy()
    assert "fit" in summary.times and not np.allclose(before, after)
    assert json.loads((out / "manifest.json").read_text())["scoring"]["fit_rows"] == 20


def test_a_foreign_folder_and_a_folder_overlapping_the_input_are_refused(workspace, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="not an hfinfluence run folder"):
        run_job(make_job(workspace, foreign))
    with pytest.raises(OutputFolderError, match="not an hfinfluence run folder"):
        run_job(make_job(workspace, foreign, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputFolderError, match="overlaps the input"):
        run_job(make_job(workspace, workspace))
    with pytest.raises(OutputFolderError, match="overlaps the input"):
        run_job(make_job(workspace, workspace / "model" / "out"))


def test_a_live_lock_is_refused(workspace, parquet_run, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    (out / "manifest.json").write_text((parquet_run / "manifest.json").read_text())
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": __import__("socket").gethostname()}))
    with pytest.raises(OutputFolderError, match="being written by another hfinfluence run"):
        run_job(make_job(workspace, out))


def test_rows_that_lose_their_completion_are_not_scored_and_never_kept(workspace, tmp_path):
    rows = pool_rows(12)
    rows[4]["prompt"] = " ".join(["the cat sat on the mat ."] * 6)
    write_jsonl(tmp_path / "pool.jsonl", rows)
    job = make_job(
        workspace,
        tmp_path / "run",
        candidates=SourceSpec(str(tmp_path / "pool.jsonl")),
        read=ReadSpec(max_length=12, truncation_side="right"),
        select=SelectSpec(keep_ratio=1.0),
    )
    summary = run_job(job)
    table = pq.read_table(tmp_path / "run" / "scores.parquet").to_pylist()
    assert table[4]["score"] is None and table[4]["rank"] is None and table[4]["truncated"]
    assert summary.scored == 11 and summary.kept == 11
    assert "row-004" not in load_dataset("parquet", data_files=str(summary.files["kept"]), split="train")["id"]
    assert "1 of 12 candidates" in (tmp_path / "run" / "report.md").read_text()


def test_push_to_hub_is_refused_offline_before_any_work(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushToHubError, match="HF_HUB_OFFLINE is set"):
        run_job(make_job(workspace, tmp_path / "run", push_to_hub="me/kept"))
    assert not (tmp_path / "run").exists()


def test_push_to_hub_uploads_the_kept_rows_privately(workspace, parquet_run, tmp_path, monkeypatch):
    """The upload itself is replaced by a recorder: no network is touched."""
    pushed = []
    monkeypatch.setattr("hfinfluence.filtering.check_push", lambda repo: None)
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append((repo, kw, self.to_list())))
    out = tmp_path / "run"
    out.mkdir()
    for name in ("manifest.json", "scores.parquet"):
        (out / name).write_bytes((parquet_run / name).read_bytes())
    run_job(make_job(workspace, out, push_to_hub="me/kept", overwrite=True))
    reference = load_dataset("parquet", data_files=str(parquet_run / "kept.parquet"), split="train").to_list()
    assert pushed == [("me/kept", {"private": True}, reference)]


def test_merge_refuses_missing_and_duplicated_rows(tmp_path):
    folder = RunFolder(tmp_path)
    folder.shards.mkdir()
    state = type("State", (), {"process_index": 0, "num_processes": 1})()

    def shard(index: int, rows: list[int]) -> None:
        table = pa.table({"row": pa.array(rows, pa.int64()), "score": pa.array([0.0] * len(rows))})
        write_shard(folder.shard_path(index), table, state)

    shard(0, [0, 1, 2])
    shard(2, [6])
    with pytest.raises(EmptyInputError, match=r"missing \[1\]"):
        merge_shards(folder, num_rows=7, shard_size=3)
    shard(1, [3, 3, 5])
    with pytest.raises(EmptyInputError, match="exactly once"):
        merge_shards(folder, num_rows=7, shard_size=3)
    shard(1, [3, 4, 5])
    merged, writers = merge_shards(folder, num_rows=7, shard_size=3)
    assert merged.column("row").to_pylist() == list(range(7)) and writers == {0: [0, 1, 2]}


def test_ranks_break_ties_by_row_and_skip_unscored_rows():
    ranks = rank_scores(np.array([1.0, np.nan, 3.0, 1.0, -2.0]))
    assert ranks.tolist() == [2, 0, 1, 3, 4]


def test_selection_rules():
    scores = np.array([5.0, np.nan, 1.0, 4.0, 3.0, 2.0, 0.0, -1.0])
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert select_rows(scores, SelectSpec(keep_ratio=0.5), groups=groups, seed=0).tolist() == [0, 3, 4, 5]
    assert select_rows(scores, SelectSpec(top_k=2), groups=groups, seed=0).tolist() == [0, 3]
    assert select_rows(scores, SelectSpec(min_score=2.0), groups=groups, seed=0).tolist() == [0, 3, 4, 5]
    quotas = SelectSpec(keep_ratio=0.5, group_quotas=True)
    assert select_rows(scores, quotas, groups=groups, seed=0).tolist() == [0, 3, 4, 5]
    quotas = SelectSpec(top_k=3, group_quotas=True)  # 3 of 7 scored rows: round(3 · 3/7) of a, round(4 · 3/7) of b
    assert select_rows(scores, quotas, groups=groups, seed=0).tolist() == [0, 4, 5]


def test_boltzmann_selection_is_seeded_and_follows_the_temperature():
    scores = np.linspace(-3, 3, 200)
    draw = SelectSpec(keep_ratio=0.1, mode="boltzmann", temperature=0.5)
    first = select_rows(scores, draw, groups=None, seed=3)
    assert first.tolist() == select_rows(scores, draw, groups=None, seed=3).tolist()
    assert first.tolist() != select_rows(scores, draw, groups=None, seed=4).tolist()
    assert scores[first].mean() > 1.5
    hot = select_rows(scores, SelectSpec(keep_ratio=0.1, mode="boltzmann", temperature=100.0), groups=None, seed=3)
    assert abs(scores[hot].mean()) < 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(keep_ratio=0.1, top_k=3), "exactly one"),
        (dict(), "exactly one"),
        (dict(keep_ratio=1.5), "keep-ratio"),
        (dict(min_score=0.0, mode="boltzmann"), "min-score"),
        (dict(keep_ratio=0.5, mode="boltzmann", temperature=0.0), "temperature"),
    ],
)
def test_bad_selection_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        SelectSpec(**settings)


def test_size_report_prints_the_sizing_table_and_memory_plan(workspace):
    text = size_report(
        model=str(workspace / "model"),
        candidates=SourceSpec(str(workspace / "pool.jsonl")),
        read=ReadSpec(max_length=24),
        influence=InfluenceConfig(sketch_dims=8),
        fit_rows=16,
        model_dtype="float64",
    )
    assert "sizing from a fit on 16 candidate rows" in text
    assert "model.layers.1.mlp.down_proj" in text and "memory plan" in text and "eigenbases" in text


def test_a_cached_curvature_is_reused_for_another_target_and_scores_the_same(workspace, tmp_path, caplog):
    write_jsonl(tmp_path / "other-target.jsonl", TARGET_ROWS[:3])
    other = SourceSpec(str(tmp_path / "other-target.jsonl"))
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="hfinfluence")
    run_job(make_job(workspace, tmp_path / "a", curvature_cache=str(cache)))
    assert "Loaded the fitted curvature from the cache" not in caplog.text
    second = run_job(make_job(workspace, tmp_path / "b", target=other, curvature_cache=str(cache)))
    assert "Loaded the fitted curvature from the cache" in caplog.text
    fresh = run_job(make_job(workspace, tmp_path / "c", target=other))
    assert len(list(cache.iterdir())) == 1
    cached, uncached = (
        pq.read_table(out / "scores.parquet").column("score").to_numpy() for out in (second.output, fresh.output)
    )
    np.testing.assert_array_equal(cached, uncached)
    report = (tmp_path / "b" / "report.md").read_text()
    assert "curvature fitted on 37 candidate rows" in report


def test_cached_gradients_score_like_the_engine_and_serve_another_target(workspace, parquet_run, tmp_path):
    """First run: gradients computed and stored; second run (other target): read back, no model pass."""
    write_jsonl(tmp_path / "other-target.jsonl", TARGET_ROWS[:3])
    other = SourceSpec(str(tmp_path / "other-target.jsonl"))
    caches = dict(curvature_cache=str(tmp_path / "curvature"), gradient_cache=str(tmp_path / "gradients"))
    run_job(make_job(workspace, tmp_path / "a", **caches))
    files = sorted((tmp_path / "gradients").rglob("shard-*.safetensors"))
    assert len(files) == 8  # 37 rows in shards of 5
    stamps = [f.stat().st_mtime_ns for f in files]

    run_job(make_job(workspace, tmp_path / "b", target=other, **caches))
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten
    run_job(make_job(workspace, tmp_path / "c", target=other))  # no caches: `Influence.score` per batch
    for name in ("a", "b"):
        cached = pq.read_table(tmp_path / name / "scores.parquet").column("score").to_numpy()
        direct = pq.read_table((tmp_path / "c" if name == "b" else parquet_run) / "scores.parquet")
        np.testing.assert_allclose(cached, direct.column("score").to_numpy(), rtol=1e-9)
    # the seed check comes from the rows whose gradients were computed (a), not from those read back (b)
    checks = {n: json.loads((tmp_path / n / "manifest.json").read_text())["info"].get("seed_check") for n in "abc"}
    assert checks["a"] is not None and checks["b"] is None
    assert checks["a"]["spearman"] == pytest.approx(
        json.loads((parquet_run / "manifest.json").read_text())["info"]["seed_check"]["spearman"]
    )
