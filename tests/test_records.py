"""Round records and run summaries: one typed record, one JSON form, one definition of
the run's figures shared by summary.json and the report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from run_helpers import as_settings
from test_round_state import config, initial_arrays, run_round

from flexmoe_core.records import (
    COLUMNS,
    TIMING_KEYS,
    AllocationRecord,
    Evaluation,
    Loads,
    Participation,
    RoundRecord,
    RunSummary,
    Scores,
    Timing,
    Traffic,
    Training,
    Trust,
    headline,
)
from flexmoe_core.report import build_report, load_run
from flexmoe_core.results import SUMMARY_FILE, RunRecorder, read_metrics, read_records
from flexmoe_core.round_state import ClientReply, RoundResults, RoundState

# The first three rounds of a run written before RoundRecord existed (metrics.jsonl
# as written then; summary.json with that run's figures for those rounds).
OLD_RUN = Path(__file__).parent / "fixtures" / "old_run"


def full_record() -> RoundRecord:
    """A record with every group and figure set (and an entry this version does not know)."""
    return RoundRecord(
        round=4,
        strategy="flexmoe",
        participation=Participation(3, 2, 1, {"2": "no reply"}, benched={"5": 6}),
        allocation=AllocationRecord(
            {"0": [1, 2], "2": [0]}, 1.5, "flexmoe-flow", [0.5, -0.5, 0.0], 0.9, 0.8, 0.5, 1, 640
        ),
        loads=Loads([1, 1, 1], [9, 3, 0], [4, 4, 4], [40, 30, 2], 0.0, 0.0, 14.0, 1.0),
        evaluation=Evaluation(0.7, 0.9, 0.5, 0.1, 0.6, 1.1, 0.4, 0.2, clients=2),
        training=Training(1.2, 0.6, 64, trained=Scores(local_acc=0.75, local_loss=0.8)),
        traffic=Traffic(300, 200, {"0": 150, "2": 150}, {"0": 200}),
        timing=Timing(0.001, 0.02, 1.5, {"train_step": 0.7, "total": 1.2}),
        trust=Trust(bounded={"0": "examples cut"}, dp_noise_std={"backbone": 0.1}, dp_epsilon=2.0),
        extra={"written_by_a_newer_version": [1, 2]},
    )


def test_a_record_survives_its_json_form() -> None:
    record = full_record()
    line = record.to_json()
    assert RoundRecord.from_json(json.loads(json.dumps(line))) == record
    # flat, under the names metrics.jsonl has always used
    assert line["load_clients_cv"] == 0.0 and line["trained_local_acc"] == 0.75
    assert line["evaluated_clients"] == 2 and line["bytes_sent_per_client"] == {"0": 150, "2": 150}
    assert set(TIMING_KEYS) <= set(line)
    # a figure not measured is absent, not null
    sparse = RoundRecord(1, participation=Participation(accepted=0))
    assert sparse.to_json() == {"round": 1, "accepted": 0}
    assert RoundRecord.from_json(sparse.to_json()) == sparse


def test_a_summary_survives_its_json_form() -> None:
    record = full_record()
    record.allocation.purity = None  # no known groups
    summary = RunSummary.from_records([record])
    assert summary.final_local_acc == 0.7 and math.isnan(summary.purity10)
    stored = json.loads(json.dumps(summary.to_json()))
    assert stored["purity10"] is None  # JSON has no NaN
    again = RunSummary.from_json(stored)
    assert [c for c, _ in COLUMNS] == list(again.columns())
    for column, value in summary.columns().items():
        assert again.columns()[column] == value or math.isnan(value), column


def test_records_written_before_are_read_as_they_were_written() -> None:
    lines = read_metrics(OLD_RUN)
    records = read_records(OLD_RUN)
    assert [r.to_json() for r in records] == lines  # nothing lost, nothing added
    assert all(not r.extra for r in records)  # every entry has its field
    assert records[0].loads.clients_cv == lines[0]["load_clients_cv"]
    assert records[1].evaluation.local_acc == lines[1]["local_acc"]
    assert "[round 2/3] local acc" in headline(records[1], 3)


def test_the_report_reads_a_run_written_before(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "old"
    shutil.copytree(OLD_RUN, run_dir)
    old = json.loads((run_dir / SUMMARY_FILE).read_text())
    columns = load_run(run_dir).summary()
    assert columns["final_local_acc"] == old["final_local_acc"]
    assert columns["best_local_acc"] == old["best_local_acc"]
    assert math.isnan(columns["final_global_acc"]) and old["final_global_acc"] is None
    assert columns["load_cv"] == pytest.approx(old["mean_load_clients_cv"])
    assert columns["cum_samples_cv"] == old["cum_load_samples_cv"]
    assert RunSummary.from_json(old).cum_samples_cv == old["cum_load_samples_cv"]
    table = build_report([tmp_path / "runs"], tmp_path / "report")
    (by_strategy,) = table.values()
    assert by_strategy["flexmoe"]["final_local_acc"] == (old["final_local_acc"], 0.0)


def test_summary_json_and_the_report_agree(tmp_path: Path) -> None:
    """One definition: the figures summary.json holds are those the report computes."""
    cfg = config("evaluate.global_every=2")
    state = RoundState(as_settings(cfg), initial_arrays())
    recorder = RunRecorder(tmp_path, as_settings(cfg))
    capacities = {k: 2 for k in range(4)}
    finished = []
    for server_round in (1, 2, 3):
        _, outcome = run_round(state, server_round, capacities)
        finished += outcome.finished
    final = state.final_evaluation()
    assert final is not None
    replies = [
        ClientReply(k, evaluation={"local": (10, 0.5, 0.25 + 0.1 * k)}) for k in final.experts
    ]
    finished += state.close(final, RoundResults(replies=replies)).finished
    for record in finished:
        recorder.log_round(record)
    recorder.save_summary(state.summary(capacities))
    stored = json.loads((tmp_path / SUMMARY_FILE).read_text())
    reported = load_run(tmp_path).summary()
    assert stored["rounds"] == len(read_metrics(tmp_path)) == 3
    assert stored["final_local_acc"] == reported["final_local_acc"] == pytest.approx(0.4)
    assert stored["best_local_acc"] == reported["best_local_acc"]
    for column, _ in COLUMNS:
        value = reported[column]
        assert stored[column] == (None if math.isnan(value) else value), column
