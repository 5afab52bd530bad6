"""The ServerApp: compose the config, run the FLEX-MoE strategy, write the results."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flexmoe_core.config import load_config
from flexmoe_core.model import build_model, shared_state
from flexmoe_core.results import RunRecorder, make_run_dir

from .strategy import FlexMoEStrategy, to_array_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FLEX-MoE for ``num_rounds`` rounds with the Hydra overrides of the run config."""
    cfg = load_config(str(context.run_config.get("overrides", "")))
    run_dir = make_run_dir(cfg)
    log(INFO, "FLEX-MoE results will be written to %s", run_dir)
    recorder = RunRecorder(run_dir, cfg)
    try:
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model, cfg.dataset.input_shape, int(cfg.dataset.num_classes))
        strategy = FlexMoEStrategy(cfg, recorder)
        strategy.start(
            grid,
            to_array_record(shared_state(model)),
            num_rounds=int(cfg.num_rounds),
            timeout=float(cfg.timeouts.round_s),
        )
        summary = strategy.final_summary()
        recorder.save_model(strategy.global_arrays)
        recorder.save_summary(summary)
        log(
            INFO,
            "Done: final local acc %s, mean per-round expert-load CV %.4f, cumulative CV "
            "%.4f. Results in %s",
            summary["final_local_acc"],
            summary["mean_load_clients_cv"],
            summary["cum_load_clients_cv"],
            run_dir,
        )
    finally:
        recorder.close()
