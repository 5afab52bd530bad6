"""The comparison in the report: paired confidence intervals, verdicts, labels, plots."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from flexmoe_core.config import load_config
from flexmoe_core.records import RoundRecord
from flexmoe_core.report import (
    BETTER,
    NO_DIFFERENCE,
    TOO_FEW,
    WORSE,
    Run,
    build_report,
    compare_to_reference,
    paired_t_interval,
    pairing_problems,
    strategy_label,
    verdict,
)


def test_paired_t_interval_by_hand() -> None:
    # d = 1, 2, 3: mean 2, s = 1, s/sqrt(3) = 0.57735; t(0.975, 2) = 4.302653
    mean, low, high = paired_t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2 - 4.302653 * 0.57735027, 2 + 4.302653 * 0.57735027))
    # d = 1, 1.5, 2, 2.5, 3: mean 2, s = 0.790569, s/sqrt(5) = 0.353553; t(0.975, 4) = 2.776445
    mean, low, high = paired_t_interval([1.0, 1.5, 2.0, 2.5, 3.0])
    assert (low, high) == pytest.approx((1.018384, 2.981616), abs=1e-5)
    assert paired_t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)  # no spread: a point
    mean, low, high = paired_t_interval([0.3])
    assert mean == 0.3 and math.isnan(low) and math.isnan(high)


def test_verdict() -> None:
    assert verdict(*paired_t_interval([1.0, 1.5, 2.0, 2.5, 3.0])[1:]) == BETTER
    assert verdict(*paired_t_interval([1.0, 2.0, 3.0])[1:]) == NO_DIFFERENCE
    assert verdict(-3.0, -0.1) == WORSE
    assert verdict(0.0, 1.0) == NO_DIFFERENCE  # touching 0 is not a detected difference
    assert verdict(math.nan, math.nan) == TOO_FEW
    assert verdict(0.0, 0.0) == NO_DIFFERENCE  # equal on every seed
    # lower is better (a load CV): an interval below 0 is better
    assert verdict(-3.0, -0.1, higher_is_better=False) == BETTER
    assert verdict(0.1, 3.0, higher_is_better=False) == WORSE
    assert verdict(-0.1, 0.0, higher_is_better=False) == NO_DIFFERENCE


def run_of(
    strategy: str, seed: int, final: float, examples: int = 100, load_cv: float = 0.1
) -> Run:
    records = [
        {"round": 1, "local_acc": final / 2, "train_examples": examples},
        {"round": 2, "local_acc": final, "global_acc": final - 0.1, "train_examples": examples},
    ]
    for record in records:
        record["load_clients_cv"] = load_cv
    return Run(
        Path(f"/runs/{strategy}-{seed}"),
        "setup",
        strategy,
        seed,
        [RoundRecord.from_json(r) for r in records],
    )


def test_differences_are_paired_by_seed() -> None:
    flex = [run_of("flexmoe", s, a) for s, a in [(0, 0.60), (1, 0.70), (2, 0.50), (3, 0.9)]]
    # greedy is 1, 2 and 3 points behind on seeds 0-2; seed 3 has no greedy run, seed 4
    # no flexmoe run: neither is paired
    greedy = [run_of("greedy", s, a) for s, a in [(0, 0.59), (1, 0.68), (2, 0.47), (4, 0.1)]]
    diffs = compare_to_reference({"flexmoe": flex, "greedy": greedy}, "setup")
    local = next(d for d in diffs if d.metric == "final_local_acc")
    assert local.other == "greedy" and local.seeds == [0, 1, 2]
    assert local.mean == pytest.approx(0.02)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (local.low, local.high) == pytest.approx((0.02 - half, 0.02 + half))
    assert local.verdict == NO_DIFFERENCE
    global_ = next(d for d in diffs if d.metric == "final_global_acc")
    assert global_.mean == pytest.approx(0.02)
    assert compare_to_reference({"greedy": greedy}) == []  # no reference: nothing to say


def test_load_cv_lower_is_better_and_not_against_dense() -> None:
    flex = [run_of("flexmoe", s, 0.6, load_cv=0.05 + 0.01 * s) for s in range(3)]
    greedy = [run_of("greedy", s, 0.6, load_cv=0.5 + 0.02 * s) for s in range(3)]
    dense = [run_of("dense", s, 0.7, load_cv=0.0) for s in range(3)]
    diffs = compare_to_reference({"flexmoe": flex, "greedy": greedy, "dense": dense})
    load = next(d for d in diffs if d.metric == "load_cv")
    # differences -0.45, -0.46, -0.47: mean -0.46, s = 0.01
    assert load.other == "greedy" and load.mean == pytest.approx(-0.46)
    assert load.verdict == BETTER
    assert {(d.other, d.metric) for d in diffs if d.other == "dense"} == {
        ("dense", "final_local_acc"),
        ("dense", "final_global_acc"),
    }
    dense_local = next(d for d in diffs if d.other == "dense" and d.metric == "final_local_acc")
    assert dense_local.verdict == WORSE  # 10 points behind on every seed: a zero-width interval


def test_pairing_check_finds_a_different_partition() -> None:
    runs = [run_of("flexmoe", 0, 0.6), run_of("greedy", 0, 0.5), run_of("random", 1, 0.5)]
    assert pairing_problems(runs) == []
    runs.append(run_of("dense", 0, 0.7, examples=99))
    (problem,) = pairing_problems(runs)
    assert "seed 0" in problem and "99 (dense)" in problem and "100 (flexmoe, greedy)" in problem


def test_ablation_runs_are_labelled_by_what_they_change() -> None:
    assert strategy_label(load_config("")) == "flexmoe"
    assert strategy_label(load_config("strategy=greedy")) == "greedy"
    assert strategy_label(load_config("fitness.beta=0.2")) == "flexmoe β=0.2"
    assert strategy_label(load_config("fitness.q0=1")) == "flexmoe q0=1"
    assert strategy_label(load_config("fitness.signal=loss model.top_k=1")) == (
        "flexmoe signal=loss top-1"
    )
    assert strategy_label(load_config("ablation=switching_off")) == "flexmoe λ=0"
    assert strategy_label(load_config("ablation=source_train")) == "flexmoe source=train"
    assert strategy_label(load_config("strategy.epsilon=0.2")) == "flexmoe ε=0.2"
    assert strategy_label(load_config("ablation=deficit_off")) == "flexmoe deficit rule off"
    assert strategy_label(load_config("baseline=fedavg_e1")) == "fedavg_e1"
    plain_mean = "aggregation.method=mean aggregation.clip_multiple=null"
    assert strategy_label(load_config(plain_mean)) == "flexmoe aggregation=mean clip× off"


def fake_run_dir(root: Path, overrides: str, accs: list[float]) -> Path:
    cfg = load_config(overrides + f" num_rounds={len(accs)}")
    run = root / overrides.replace(" ", "_").replace("=", "-")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    lines = [
        {
            "round": r + 1,
            "local_acc": a,
            "global_acc": a - 0.1 if r == len(accs) - 1 else None,
            "load_clients": [4, 4, 3, 5],
            "load_clients_cv": 0.1,
            "cum_load_clients_cv": 0.05,
            "bytes_sent": 2e6,
            "bytes_received": 1e6,
            "train_examples": 640,
        }
        for r, a in enumerate(accs)
    ]
    for line in lines:
        if line["global_acc"] is None:
            del line["global_acc"]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    return run


def test_report_writes_comparisons_run_rows_and_shared_scale_plots(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (flex, greedy, beta) in enumerate(
        [(0.6, 0.5, 0.58), (0.7, 0.62, 0.7), (0.65, 0.6, 0.6)]
    ):
        fake_run_dir(runs, f"seed={seed}", [0.3, flex])
        fake_run_dir(runs, f"seed={seed} strategy=greedy", [0.3, greedy])
        fake_run_dir(runs, f"seed={seed} fitness.beta=0.2", [0.3, beta])
    table = build_report([runs], tmp_path / "out")
    (setup,) = table
    assert list(table[setup]) == ["flexmoe", "flexmoe β=0.2", "greedy"]
    out = tmp_path / "out"
    markdown = (out / "results.md").read_text()
    # flexmoe - greedy = 10, 8, 5 points: mean 7.67, s = 2.517, half-width 6.25
    assert "| greedy | 3 | +7.7 [+1.4, +13.9] | better |" in markdown
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 9 and {r["strategy"] for r in rows} == {
        "flexmoe",
        "greedy",
        "flexmoe β=0.2",
    }
    row = next(r for r in rows if r["strategy"] == "greedy" and r["seed"] == "0")
    assert float(row["final_local_acc"]) == pytest.approx(0.5)
    assert float(row["final_global_acc"]) == pytest.approx(0.4)
    assert row["bytes_total"] == "6000000" and row["load_cv_per_round"] == "0.1000 0.1000"
    comparisons = list(csv.DictReader((out / "comparisons.csv").open()))
    assert {(c["other"], c["metric"]) for c in comparisons} == {
        (o, m)
        for o in ("greedy", "flexmoe β=0.2")
        for m in ("final_local_acc", "final_global_acc", "load_cv")
    }
    assert len(list(out.glob("*.png"))) == 3
    only = build_report([runs], tmp_path / "only", strategies=["flexmoe"])
    assert list(only[setup]) == ["flexmoe", "flexmoe β=0.2"]


def test_single_expert_runs_join_every_setup_of_their_data(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in range(2):
        fake_run_dir(runs, f"seed={seed}", [0.3, 0.6])
        fake_run_dir(runs, f"seed={seed} capacity.high=3", [0.3, 0.6])  # another setup
        fake_run_dir(runs, f"seed={seed} baseline=fedavg_e1", [0.3, 0.5 + 0.01 * seed])
        fake_run_dir(runs, f"seed={seed} baseline=fedavg_e1 partition=iid", [0.3, 0.5])
    table = build_report([runs], tmp_path / "out")
    by_setup = {setup: list(strategies) for setup, strategies in table.items()}
    moe = [s for s in by_setup if "E=8" in s]
    assert len(moe) == 2 and all(by_setup[s] == ["flexmoe", "fedavg_e1"] for s in moe)
    (alone,) = [s for s in by_setup if "iid" in s]  # no MoE setup of that data
    assert by_setup[alone] == ["fedavg_e1"]
    comparisons = list(csv.DictReader((tmp_path / "out" / "comparisons.csv").open()))
    local = [c for c in comparisons if c["metric"] == "final_local_acc"]
    assert len(local) == 2 and all(c["other"] == "fedavg_e1" for c in local)
    assert float(local[0]["mean"]) == pytest.approx(0.095)  # 10 and 9 points
    assert not [c for c in comparisons if c["metric"] == "load_cv"]


def test_heatmaps_share_one_colour_scale(tmp_path: Path) -> None:
    from flexmoe_core import plots

    drawn = []
    original = plots.draw_load_heatmap

    def spy(ax, loads, vmin=None, vmax=None, colorbar=True):
        drawn.append((vmin, vmax, colorbar))
        return original(ax, loads, vmin, vmax, colorbar)

    plots.draw_load_heatmap = spy
    try:
        plots.plot_load_heatmaps(
            "setup",
            {"flexmoe": ("a", [[4, 4], [4, 4]]), "greedy": ("b", [[1, 7], [0, 8]])},
            tmp_path / "heat.png",
        )
    finally:
        plots.draw_load_heatmap = original
    assert drawn == [(0.0, 8.0, False), (0.0, 8.0, False)]
    assert np.isclose(8.0, max(drawn)[1])


def test_runs_of_settings_the_labels_hide_are_reported(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_run_dir(runs, "seed=0", [0.3, 0.6])
    fake_run_dir(runs, "seed=0 train.lr=0.1", [0.3, 0.7])  # same setup, strategy and seed
    fake_run_dir(runs, "seed=0 strategy=greedy", [0.3, 0.5])
    with pytest.warns(UserWarning, match=r"flexmoe, seed 0: 2 runs .* differ in train\.lr"):
        build_report([runs], tmp_path / "out")
    assert "--setup-keys train.lr" in (tmp_path / "out" / "results.md").read_text()
    # told apart, they are two setups, each with its own comparison, and the check is quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = build_report([runs], tmp_path / "apart", setup_keys=["train.lr"])
    by_lr = {setup.rsplit("=", 1)[1]: list(strategies) for setup, strategies in table.items()}
    assert by_lr == {"0.05": ["flexmoe", "greedy"], "0.1": ["flexmoe"]}
    comparisons = list(csv.DictReader((tmp_path / "apart" / "comparisons.csv").open()))
    assert {c["other"] for c in comparisons} == {"greedy"}
    assert all(c["setup"].endswith("train.lr=0.05") for c in comparisons)


def test_a_setting_every_strategy_shares_belongs_to_the_setup(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (flex, greedy) in enumerate([(0.6, 0.5), (0.7, 0.62), (0.65, 0.6)]):
        fake_run_dir(runs, f"seed={seed} model.top_k=1", [0.3, flex])
        fake_run_dir(runs, f"seed={seed} model.top_k=1 strategy=greedy", [0.3, greedy])
        fake_run_dir(runs, f"seed={seed} model.top_k=1 fitness.beta=0.2", [0.3, flex])
    table = build_report([runs], tmp_path / "out")
    (setup,) = table
    assert setup.endswith(" · top-1")
    assert list(table[setup]) == ["flexmoe", "flexmoe β=0.2", "greedy"]
    # The strategies are compared with flexmoe although none is labelled plain `flexmoe`
    # by conf/'s defaults (top-2).
    assert (
        "| greedy | 3 | +7.7 [+1.4, +13.9] | better |"
        in (tmp_path / "out" / "results.md").read_text()
    )
