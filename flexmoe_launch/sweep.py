"""Hydra entry point: one Flower run per job, for grids, searches and any launcher.

    flexmoe-sweep -m strategy=flexmoe,greedy seed=0,1,2 hydra.sweep.dir=multirun/cmp
    flexmoe-sweep search=cpu_flexmoe                      # Optuna search (conf/search/)
    flexmoe-sweep -m seed=0,1,2,3 hydra/launcher=joblib hydra.launcher.n_jobs=2 ...

Each job composes the same ``conf/`` tree, then launches ``flwr run <app> --stream``
with the job's overrides, so a sweep job and a hand-typed ``flwr run`` are the same
run. A job

- runs in its own folder, ``<sweep dir>/<num>_<overrides>``, which is also the run's
  folder (``output_root``/``run_name``);
- in simulation, uses a SuperLink of its own (own Flower home and port, see
  :mod:`flexmoe_launch.local_superlink`), so jobs can run side by side under the joblib
  or submitit launchers, and stops it when it ends;
- is skipped when its folder already holds a completed run of the same overrides,
  and resumes from its checkpoint when an earlier attempt was interrupted
  (``checkpoint.resume=true``): re-running a sweep command finishes the sweep;
- writes ``status.json`` (:class:`flexmoe_core.report.JobStatus`) and returns the
  run's objective (``sweep.objective``) to Hydra's sweeper, or None when the run
  failed: Optuna's sweeper then records a failed trial and the study goes on
  (see :func:`main` for why not NaN or an exception).

:class:`SweepCallback` (``hydra.callbacks`` in ``conf/config.yaml``) checks the sweep
settings before the first job, and prints the outcome, the best configuration and
the commands that reproduce it after the last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flexmoe_core.checkpoint import CHECKPOINT_FILE
from flexmoe_core.config import conf_dir
from flexmoe_core.report import (
    COMPLETED,
    FAILED,
    OBJECTIVES,
    JobStatus,
    best_job,
    find_sweep_jobs,
    run_objective,
    run_state,
)
from flexmoe_core.results import CONFIG_FILE, METRICS_FILE

from .local_superlink import SuperLinkError, private_superlink
from .processes import stop_child

ROUND_LINE = re.compile(r"\[round (\d+)/(\d+)\]")
STATE_FILE = ".flexmoe_sweep.json"  # in the sweep dir: when this run of the sweep started
DIRECTIONS = ("maximize", "minimize")
# sweep.federation value that runs each job's simulation in the job's own process
INPROCESS = "inprocess"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # read by ray.init in every job's simulation
_IMPORTED_AT = time.time()


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class SweepSettings:
    """The ``sweep:`` block of the configuration, checked (its only validator)."""

    app_dir: Path | None
    federation: str | None
    federation_config: str
    flwr: str | None
    objective: str
    direction: str
    stream_log: bool

    @classmethod
    def from_config(cls, sweep: Any) -> SweepSettings:
        """Read and check ``cfg.sweep``; raise ``ValueError`` naming the bad key."""
        errors = []
        objective = str(sweep.get("objective", "final_local_acc"))
        if objective not in OBJECTIVES:
            errors.append(f"sweep.objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
        direction = str(sweep.get("direction", "maximize"))
        if direction not in DIRECTIONS:
            errors.append(f"sweep.direction={direction!r}: choose maximize or minimize")
        federation_config = str(sweep.get("federation_config") or "")
        if "num-supernodes" in federation_config:
            errors.append(
                f"sweep.federation_config={federation_config!r}: leave num-supernodes out, "
                "it is set from num_clients"
            )
        if '"' in federation_config:
            errors.append(f"sweep.federation_config={federation_config!r}: use single quotes")
        # With RAY_ADDRESS set, every job's simulation attaches to that Ray cluster, and
        # ray.init refuses CPU or GPU counts when it attaches (they are the cluster's).
        if (cluster := os.environ.get(RAY_ADDRESS_ENV)) and "init-args-num-" in federation_config:
            errors.append(
                f"sweep.federation_config={federation_config!r}: {RAY_ADDRESS_ENV}={cluster} "
                "attaches the jobs to a Ray cluster, whose nodes set their own CPUs and GPUs; "
                "leave init-args-num-cpus/-gpus out (client-resources-* size each client)"
            )
        if errors:
            raise ValueError("Invalid sweep settings:\n  - " + "\n  - ".join(errors))
        app_dir = sweep.get("app_dir")
        return cls(
            app_dir=Path(str(app_dir)).expanduser().resolve() if app_dir else None,
            federation=str(sweep.federation) if sweep.get("federation") else None,
            federation_config=federation_config,
            flwr=str(sweep.flwr) if sweep.get("flwr") else None,
            objective=objective,
            direction=direction,
            stream_log=bool(sweep.get("stream_log", False)),
        )


@dataclass(frozen=True)
class SweepState:
    """One run of a sweep command: when it started, how many jobs, how many at once."""

    started: float
    jobs: int
    parallel: int

    def write(self, sweep_dir: Path) -> None:
        """Write ``<sweep dir>/.flexmoe_sweep.json`` (read by every job)."""
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / STATE_FILE).write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepState | None:
        """Read it back (None for a single run or when the callback is switched off)."""
        try:
            return cls(**json.loads((sweep_dir / STATE_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def count_jobs(argv: Sequence[str]) -> int:
    """Return how many jobs a multirun command line expands to (1 without sweeps)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # an unparsable line fails in Hydra itself, with its own message
        return 1
    sizes = [len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    return max(1, math.prod(sizes)) if sizes else 1


def sweep_size(config: DictConfig) -> tuple[int, int]:
    """Return (jobs, jobs at once) of a multirun configuration."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:  # Optuna: asks n_jobs trials at a time
        jobs, batch = int(sweeper.n_trials), int(sweeper.get("n_jobs") or 1)
    else:
        params = sweeper.get("params") or {}
        overrides = [*config.hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())]
        jobs, batch = count_jobs(overrides), sys.maxsize
    launcher = config.hydra.launcher
    if "n_jobs" in launcher:  # joblib: -1 means every core, -2 all but one, ...
        n_jobs = int(launcher.n_jobs)
        at_once = n_jobs if n_jobs > 0 else (os.cpu_count() or 1) + 1 + n_jobs
    elif "array_parallelism" in launcher:  # submitit on SLURM
        at_once = int(launcher.array_parallelism)
    elif "submitit_folder" in launcher:  # submitit_local runs a batch at once
        at_once = jobs
    else:
        at_once = 1
    return jobs, max(1, min(at_once, batch, jobs))


# ------------------------------------------------------------------ one job
def hydra_quote(value: str) -> str:
    """Quote a value for a Hydra override (job folder names hold '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_overrides(task_overrides: Sequence[str]) -> list[str]:
    """Return the overrides that define the run: not ``sweep.*`` nor the search preset."""
    return [
        o
        for o in task_overrides
        if not (_key(o) in ("sweep", "search") or _key(o).startswith("sweep."))
    ]


def default_app_dir() -> Path:
    """Return the project folder holding ``pyproject.toml`` (a source checkout)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"No pyproject.toml beside {root}; set sweep.app_dir to the FLEX-MoE app folder"
        )
    return root


def flwr_command(
    settings: SweepSettings, app_dir: Path, num_clients: int, overrides: Sequence[str]
) -> list[str]:
    """Return the ``flwr run`` command of one job."""
    flwr = Path(sys.executable).with_name("flwr")
    default = str(flwr) if flwr.exists() else "flwr"
    command = [*(shlex.split(settings.flwr) if settings.flwr else [default]), "run", str(app_dir)]
    if settings.federation:
        command.append(settings.federation)
    else:
        federation = f"num-supernodes={num_clients} {settings.federation_config}".strip()
        command += ["--federation-config", federation]
    joined = " ".join(overrides)
    if '"' in joined:  # Flower's run-config string cannot hold a double quote
        raise ValueError(f"Use single quotes in overrides, not double quotes: {joined}")
    return [*command, "--stream", "--run-config", f'overrides="{joined}"']


@dataclass
class Job:
    """The running Hydra job: where it runs, which one it is, how far the sweep got."""

    dir: Path
    num: int
    overrides: list[str]  # run_overrides of the job's task overrides
    sweep_dir: Path
    state: SweepState

    @classmethod
    def current(cls) -> Job:
        """Describe the running Hydra job."""
        hydra_cfg = HydraConfig.get()
        job_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        cwd = Path(hydra_cfg.runtime.cwd)  # a relative sweep dir is relative to the launch
        sweep_dir = (cwd / hydra_cfg.sweep.dir).resolve() if multirun else job_dir.parent
        state = SweepState.read(sweep_dir) if multirun else None
        if state is None:
            jobs = count_jobs(sys.argv[1:]) if multirun else 1
            state = SweepState(started=_IMPORTED_AT, jobs=jobs, parallel=1)
        return cls(
            dir=job_dir.resolve(),
            num=int(hydra_cfg.job.get("num", 0) or 0),
            overrides=run_overrides(list(hydra_cfg.overrides.task)),
            sweep_dir=sweep_dir,
            state=state,
        )

    @property
    def label(self) -> str:
        """Short description for progress lines."""
        text = " ".join(self.overrides) or "defaults"
        return text if len(text) <= 90 else text[:87] + "..."

    def siblings(self) -> list[JobStatus]:
        """Return the status of every job of the sweep so far."""
        return find_sweep_jobs([self.sweep_dir]).get(self.sweep_dir, [])


class Progress:
    """Turns ``[round r/R]`` lines of a job into sweep progress lines."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.started = time.monotonic()
        since = job.state.started
        siblings = job.siblings()
        self.skipped = sum((s.skipped_at or 0) >= since for s in siblings)
        ran = [s.seconds for s in siblings if (s.finished_at or 0) >= since and s.seconds]
        self.done = self.skipped + len(ran)
        self.per_job = sum(ran) / len(ran) if ran else None
        self.rounds_before: int | None = None  # rounds a resumed run had done before

    def line(self, text: str) -> str | None:
        """Return a progress line for a Flower log line (``None`` if it is not a round)."""
        match = ROUND_LINE.search(text)
        if match is None:
            return None
        done, total = int(match.group(1)), int(match.group(2))
        state = self.job.state
        if self.rounds_before is None:
            self.rounds_before = done - 1
        elapsed_job = time.monotonic() - self.started
        this_job_left = elapsed_job / max(done - self.rounds_before, 1) * (total - done)
        per_job = self.per_job or elapsed_job + this_job_left  # else extrapolate this one
        others_left = max(state.jobs - self.done - state.parallel, 0)
        left = this_job_left + per_job * others_left / state.parallel
        skipped = f" | {self.skipped} skipped (done before)" if self.skipped else ""
        return (
            f"[sweep] job {self.job.num + 1}/{state.jobs} ({self.job.label}): round "
            f"{done}/{total} | elapsed {time.time() - state.started:.0f} s | "
            f"about {left:.0f} s left{skipped}"
        )


def _stream(
    command: list[str], env: dict[str, str], cwd: Path, log: Path, echo: Callable[[str], None]
) -> int:
    """Run ``command``, copying its output to ``log`` and each line to ``echo``."""
    with open(log, "a", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()  # a killed sweep keeps its log up to the kill
                echo(line)
            return process.wait()
        finally:
            stop_child(process, grace_s=10.0)  # interrupted: do not leave `flwr run` behind


def start_over_without_checkpoint(job_dir: Path) -> bool:
    """Prepare an interrupted job folder; return whether a checkpoint will be resumed.

    An attempt that logged rounds but left no checkpoint (``checkpoint.enabled=false``,
    or killed before its first one) cannot be continued: its ``metrics.jsonl`` is
    kept aside as ``metrics.jsonl.interrupted-<n>`` and the run starts again.
    """
    if (job_dir / CHECKPOINT_FILE).is_file():
        return True
    metrics = job_dir / METRICS_FILE
    if metrics.is_file():
        n = 1
        while (aside := job_dir / f"{METRICS_FILE}.interrupted-{n}").exists():
            n += 1
        metrics.rename(aside)
    return False


def _objective(job_dir: Path, settings: SweepSettings) -> float:
    try:
        return run_objective(job_dir, settings.objective)
    except (OSError, ValueError, KeyError):
        return math.nan


def _value(number: float) -> float | None:
    return number if math.isfinite(number) else None


def skip_finished(job: Job, settings: SweepSettings, previous: JobStatus | None) -> float | None:
    """Record that a completed job was skipped and return its objective."""
    value = _objective(job.dir, settings)
    status = previous or JobStatus(job=job.num, overrides=job.overrides, status=COMPLETED)
    status.status = COMPLETED
    status.objective, status.direction = settings.objective, settings.direction
    status.value, status.skipped_at = _value(value), time.time()
    status.write(job.dir)
    skipped = sum((s.skipped_at or 0) >= job.state.started for s in job.siblings())
    print(
        f"[sweep] job {job.num + 1}/{job.state.jobs} ({job.label}): completed in an earlier "
        f"run of this sweep, skipped ({settings.objective} {value:.4f}) | {skipped} skipped",
        flush=True,
    )
    return _value(value)


def run_in_this_process(overrides: Sequence[str], log: Path, echo: Callable[[str], None]) -> int:
    """Run one job's simulation in this process (``sweep.federation=inprocess``).

    The ServerApp and ClientApp run as under ``flwr run``, on an in-process grid
    (:mod:`server_app.inprocess`). Flower's log goes to ``log`` and, line by line, to
    ``echo`` (as a ``flwr run`` job's output does), not to the console. Returns 0, or
    1 when the run failed (its summary.json says why, as under ``flwr run``).
    """
    from flexmoe_core.config import load_config
    from server_app.inprocess import run_inprocess

    # load_config composes with Hydra's global state, which this (Hydra) job's
    # launcher still needs for the jobs after this one.
    hydra_state = Singleton.get_state()
    try:
        cfg = load_config(list(overrides))
    finally:
        Singleton.set_state(hydra_state)

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            echo(self.format(record) + "\n")

    formatter = logging.Formatter("%(levelname)s %(asctime)s: %(message)s")
    to_file, to_echo = logging.FileHandler(log, encoding="utf-8"), Echo()
    flower_logger = logging.getLogger("flwr")
    console = list(flower_logger.handlers)
    for handler in console:
        flower_logger.removeHandler(handler)
    for handler in (to_file, to_echo):
        handler.setFormatter(formatter)
        flower_logger.addHandler(handler)
    try:
        run_inprocess(cfg)
        return 0
    except Exception as err:  # the run wrote its failed summary; the job reports it
        flower_logger.error("the run failed: %s: %s", type(err).__name__, err)
        return 1
    finally:
        for handler in (to_file, to_echo):
            flower_logger.removeHandler(handler)
        to_file.close()
        for handler in console:
            flower_logger.addHandler(handler)


def run_job(cfg: DictConfig, settings: SweepSettings, job: Job) -> float | None:
    """Run (or skip, or resume) one job; return its objective, None if it failed."""
    previous = JobStatus.read(job.dir)
    if run_state(job.dir) == COMPLETED:
        if previous is None or previous.overrides == job.overrides:
            return skip_finished(job, settings, previous)
        error = (
            f"{job.dir} holds a completed run of other overrides ({' '.join(previous.overrides)})"
            "; give this sweep its own folder: hydra.sweep.dir=<new folder>"
        )
        print(f"[sweep] job {job.num + 1}/{job.state.jobs} FAILED: {error}", flush=True)
        return None  # the folder is left as it is: nothing is lost

    resumed = start_over_without_checkpoint(job.dir)
    overrides = [
        *job.overrides,
        f"output_root={hydra_quote(str(job.dir.parent))}",
        f"run_name={hydra_quote(job.dir.name)}",
    ]
    if not any(_key(o) == "checkpoint.resume" for o in overrides):
        overrides.append("checkpoint.resume=true")  # start, or pick up where it stopped
    app_dir = settings.app_dir or default_app_dir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    progress = Progress(job)

    def echo(line: str) -> None:
        if settings.stream_log:
            print(line, end="", flush=True)
        elif (message := progress.line(line)) is not None:
            print(message, flush=True)

    start = "resuming from its checkpoint" if resumed else "starting"
    print(
        f"[sweep] job {job.num + 1}/{job.state.jobs} ({job.label}): {start} -> {job.dir}",
        flush=True,
    )
    log = job.dir / "flwr.log"  # appended to: every attempt of the job stays in it
    with open(log, "a", encoding="utf-8") as log_file:
        log_file.write(f"--- flexmoe-sweep: {start}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    code, error = None, None
    try:
        if settings.federation == INPROCESS:
            code = run_in_this_process(overrides, log, echo)
        else:
            command = flwr_command(settings, app_dir, int(cfg.num_clients), overrides)
            with contextlib.ExitStack() as stack:
                if settings.federation is None:
                    link = stack.enter_context(private_superlink(env, app_dir))
                    env.update(link.env())
                code = _stream(command, env, app_dir, log, echo)
    except (OSError, ValueError, SuperLinkError) as exc:
        error = str(exc)
    seconds = time.monotonic() - progress.started
    state = run_state(job.dir)
    value = _objective(job.dir, settings) if state == COMPLETED else math.nan
    JobStatus(
        job=job.num,
        overrides=job.overrides,
        status=COMPLETED if state == COMPLETED else FAILED,
        objective=settings.objective,
        direction=settings.direction,
        value=_value(value),
        exit_code=code,
        seconds=seconds,
        finished_at=time.time(),
        resumed=resumed,
        error=error,
    ).write(job.dir)
    head = f"[sweep] job {job.num + 1}/{job.state.jobs}"
    if state == COMPLETED:
        note = "" if math.isfinite(value) else " (not measured: the trial counts as failed)"
        print(f"{head} done in {seconds:.0f} s: {settings.objective} {value:.4f}{note}")
    else:
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        why = error or f"no completed summary (flwr exit code {code})"
        print(f"{head} FAILED after {seconds:.0f} s: {why}; log: {log}\n" + "\n".join(tail))
    sys.stdout.flush()
    return _value(value)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one Flower simulation for this Hydra job; return its objective (None: failed).

    Why None for a failed run: Hydra's Optuna sweeper (1.3) records a trial whose
    value is not a number as failed and goes on. A raised exception stops the study
    (unless ``hydra.sweeper.max_failure_rate`` allows it) and the basic sweeper after
    the batch; NaN makes the Optuna sweeper itself raise (it passes the NaN along
    with the failed state, which Optuna refuses).
    """
    return run_job(cfg, SweepSettings.from_config(cfg.sweep), Job.current())


# ------------------------------------------------------------------ the whole sweep
def reproduce_commands(job: JobStatus, settings: SweepSettings) -> list[str]:
    """Return a ``flexmoe-sweep`` and a ``flwr run`` command that repeat ``job``'s run."""
    num_clients = 10
    if job.path is not None and (job.path / CONFIG_FILE).is_file():
        num_clients = int(OmegaConf.load(job.path / CONFIG_FILE).num_clients)
    app_dir = settings.app_dir or default_app_dir()
    flwr = flwr_command(
        SweepSettings(**{**asdict(settings), "flwr": "flwr"}), app_dir, num_clients, job.overrides
    )
    return [shlex.join(["flexmoe-sweep", *job.overrides]), shlex.join(flwr)]


class SweepCallback(Callback):
    """Checks the sweep before its first job; sums it up after the last one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``sweep.*``, record when this run of the sweep started, warn if unnamed."""
        SweepSettings.from_config(config.sweep)  # a typo fails now, not in every job
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        jobs, parallel = sweep_size(config)
        SweepState(started=time.time(), jobs=jobs, parallel=parallel).write(sweep_dir)
        print(f"[sweep] {jobs} jobs, {parallel} at a time -> {sweep_dir}", flush=True)
        raw = OmegaConf.to_container(config.hydra.sweep, resolve=False)
        if isinstance(raw, dict) and "${now:" in str(raw.get("dir")):
            print(
                "[sweep] this folder is named by the time, so running the command again "
                "starts over; to be able to re-run it and skip finished jobs, name it: "
                "hydra.sweep.dir=multirun/<name>",
                flush=True,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print how the jobs went, the best one and the commands that reproduce it."""
        settings = SweepSettings.from_config(config.sweep)
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        state = SweepState.read(sweep_dir)
        since = state.started if state else 0.0
        jobs = find_sweep_jobs([sweep_dir]).get(sweep_dir, [])
        skipped = [j for j in jobs if (j.skipped_at or 0) >= since]
        ran = [j for j in jobs if (j.finished_at or 0) >= since and j not in skipped]
        failed = [j for j in ran if j.status == FAILED]
        print(
            f"[sweep] finished: {len(ran) + len(skipped)} jobs in {sweep_dir}: "
            f"{len(ran) - len(failed)} ran and completed, {len(skipped)} skipped (completed "
            f"in an earlier run), {len(failed)} failed",
            flush=True,
        )
        best = best_job([*ran, *skipped] or jobs, settings.direction)
        if best is not None:
            print(
                f"[sweep] best ({settings.direction} {settings.objective}): job {best.job}, "
                f"{settings.objective} = {best.value:.4f}\n"
                f"  {' '.join(best.overrides) or '(defaults)'}\n"
                "[sweep] reproduce it with either of:\n  "
                + "\n  ".join(reproduce_commands(best, settings)),
                flush=True,
            )
        print(
            f"[sweep] report: flexmoe-report {shlex.quote(str(sweep_dir))} "
            f"--out {shlex.quote(str(sweep_dir / 'report'))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
