"""The ServerApp: compose the config, run the FLEX-MoE strategy, write the results."""

from __future__ import annotations

from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from omegaconf import DictConfig

from flexmoe_core.checkpoint import (
    CheckpointError,
    ServerCheckpoint,
    check_model_arrays,
    checkpoint_path,
    config_differences,
    load_checkpoint,
)
from flexmoe_core.config import load_config, settings_from_config
from flexmoe_core.data import DatasetError, label_counts, plot_label_distribution
from flexmoe_core.model import build_model, shared_state
from flexmoe_core.results import (
    RunDirError,
    RunRecorder,
    claim_run_dir,
    make_run_dir,
    release_run_dir,
    run_status,
)
from flexmoe_core.settings import Settings

from .codec import to_array_record
from .strategy import FlexMoEStrategy

app = ServerApp()


def _resume_setting(value: object) -> bool | str | None:
    """Read ``checkpoint.resume``: None/false (new run), true, or a run directory."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    text = str(value).strip()
    if text.lower() in ("", "false", "null", "none"):
        return None
    return True if text.lower() == "true" else text


def open_run(settings: Settings) -> tuple[Settings, Path, ServerCheckpoint | None]:
    """Pick the run directory, new or to resume, and load its checkpoint if resuming.

    ``checkpoint.resume=<run dir>`` resumes that run (its checkpoint must exist);
    ``checkpoint.resume=true`` resumes ``<output_root>/<run_name>`` if it holds a
    checkpoint and starts it otherwise, so the same command both starts a run and
    picks it up after a crash. The returned settings carry the run directory's
    name as ``run_name``: clients key their gate versions by it.

    Raises
    ------
    CheckpointError
        If the checkpoint is missing or unreadable, or the run was configured
        differently (other than in :data:`flexmoe_core.checkpoint.RESUMABLE_CHANGES`).
    RunDirError
        If ``output_root`` is not a folder, or the run to resume is running now.
    """
    resume = _resume_setting(settings.checkpoint.resume)
    checkpoint: ServerCheckpoint | None = None
    if resume is True:
        if not settings.run_name:
            raise CheckpointError(
                "checkpoint.resume=true needs a fixed run_name (e.g. run_name=my_run) to "
                "know which run to pick up; or give the run directory: "
                "checkpoint.resume=/path/to/outputs/<run>"
            )
        candidate = Path(settings.output_root).expanduser().resolve() / settings.run_name
        if checkpoint_path(candidate).is_file():
            run_dir, checkpoint = candidate, load_checkpoint(checkpoint_path(candidate))
        else:
            log(INFO, "No checkpoint in %s: starting the run from round 1", candidate)
            run_dir = make_run_dir(settings)
    elif resume is not None:
        run_dir = Path(resume).expanduser().resolve()
        checkpoint = load_checkpoint(checkpoint_path(run_dir))
    else:
        run_dir = make_run_dir(settings)
    if checkpoint is not None and not claim_run_dir(run_dir):
        raise RunDirError(
            f"cannot resume {run_dir}: another run is using it now (it holds "
            f"{run_dir / '.run.lock'}); wait for it to end, or stop it first"
        )
    if checkpoint is not None and (
        changed := config_differences(checkpoint.config, settings.to_dict())
    ):
        release_run_dir(run_dir)
        raise CheckpointError(
            f"cannot resume {run_dir}: the configuration differs from the interrupted "
            "run's in " + "; ".join(changed) + ". Resume with the same overrides (only "
            "checkpoint.*, timeouts.*, wandb.*, sweep.*, num_rounds, output_root, run_name, "
            "dataset.cache_dir and train.device may change)."
        )
    return settings.with_run_name(run_dir.name), run_dir, checkpoint


# Above this many partitions the clients x classes plot is too tall to read.
MAX_PLOTTED_CLIENTS = 100


def save_label_distribution(settings: Settings, run_dir: Path, partitions: set[int]) -> None:
    """Plot the clients x classes label counts of the partition the clients declared.

    ``partitions`` holds the ``num-partitions`` the nodes reported (simulation, trial
    nodes). Nodes with their own ``data-path`` report none, and the server does not
    see their data: then there is no plot.
    """
    if len(partitions) != 1:
        log(INFO, "No label-distribution plot: the clients hold their own data")
        return
    (count,) = partitions
    if count > MAX_PLOTTED_CLIENTS:
        log(INFO, "No label-distribution plot for %d clients (over %d)", count, MAX_PLOTTED_CLIENTS)
        return
    try:
        counts = label_counts(settings.dataset, settings.partition, count, settings.seed)
    except (DatasetError, OSError) as err:
        log(WARNING, "No label-distribution plot: %s", err)
        return
    title = f"{settings.dataset.name}, {settings.partition.type} partition, {count} clients"
    plot_label_distribution(counts, run_dir / "label_distribution.png", title)


def run(grid: Grid, cfg: DictConfig) -> Path:
    """Run FLEX-MoE on ``grid`` with configuration ``cfg``; return the run directory.

    ``cfg`` is a configuration :func:`load_config` validated; its typed settings are
    built here, once, and the core reads only those.
    """
    settings, run_dir, checkpoint = open_run(settings_from_config(cfg))
    log(INFO, "FLEX-MoE results will be written to %s", run_dir)
    if checkpoint is not None:
        log(INFO, "Resuming from %s (after round %d)", checkpoint_path(run_dir), checkpoint.round)
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, settings.dataset.input_shape, settings.dataset.num_classes)
    if checkpoint is not None:
        check_model_arrays(checkpoint, shared_state(model), str(checkpoint_path(run_dir)))
    recorder = RunRecorder(run_dir, settings)
    strategy: FlexMoEStrategy | None = None
    try:
        strategy = FlexMoEStrategy(
            settings,
            recorder,
            checkpoint_path=checkpoint_path(run_dir) if settings.checkpoint.enabled else None,
            resume=checkpoint,
        )
        strategy.start(
            grid,
            to_array_record(shared_state(model)),
            num_rounds=settings.num_rounds,
            timeout=settings.timeouts.round_s,
        )
        summary = strategy.final_summary()
        recorder.save_model(strategy.global_arrays)
        recorder.save_summary(summary)
        if "dp_epsilon" in summary:
            log(
                INFO,
                "Differential privacy: (epsilon %.4g, delta %g) after %d rounds",
                summary["dp_epsilon"],
                summary["dp_delta"],
                summary["rounds"],
            )
        save_label_distribution(settings, run_dir, strategy.roster.num_partitions())
        log(
            INFO,
            "Done: final local acc %s, mean per-round expert-load CV %.4f, cumulative CV "
            "%.4f. Results in %s",
            summary["final_local_acc"],
            summary["load_cv"],
            summary["cum_load_cv"],
            run_dir,
        )
    except Exception as err:
        # flwr run exits 0 even when the ServerApp fails: summary.json's status is how
        # a script (and the sweep) tells a failed run from a finished one.
        error = f"{type(err).__name__}: {err}"
        failed = run_status(error) if strategy is None else strategy.final_summary(error)
        recorder.save_summary(failed)
        log(ERROR, "The run failed (summary.json has status failed): %s", error)
        raise
    finally:
        recorder.close()
        release_run_dir(run_dir)
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FLEX-MoE for ``num_rounds`` rounds with the Hydra overrides of the run config."""
    run(grid, load_config(str(context.run_config.get("overrides", ""))))
