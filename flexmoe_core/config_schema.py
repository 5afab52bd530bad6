"""The configuration schema: one row per setting, checked once Hydra has composed ``conf/``.

The keys declared under ``conf/`` and the check of overrides against them, before
Hydra composes, are in :mod:`flexmoe_core.config_keys` (re-exported here).

Every key a run reads has one :class:`Setting` row in :data:`SETTINGS`: its type, its
range or choices, and what it means. A bad value is refused with a message that names
the key, the value, the rule and a fix (``num_rounds='abc': expected an integer ...;
fix: e.g. num_rounds=20``). To add a setting, declare it in a ``conf/`` file and add
its row here.

Unknown keys. A key that no file under ``conf/`` declares is refused with the closest
known key (``num_round`` -> ``num_rounds``), both as an override (``num_round=3``,
before Hydra would suggest ``+num_round=3``) and as an addition (``+num_round=3``,
which Hydra would accept and nothing would read). Additions (``+key=value``) are
refused everywhere except under ``sweep.`` (the sweep entry point's own settings,
left lenient here): a key that the selected config group option does not declare
(``+partition.alpha=0.5`` with ``partition=iid``) would be ignored, so the message
says which option declares it instead.

Keys of the ``model`` group are checked only as far as the table lists them: a model
key declared in ``conf/model/*.yaml`` without a row is accepted unchecked, so that new
model options do not break validation before their row is written.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .allocation.registry import STRATEGY_NAMES
from .backbones import BACKBONES, moe_cut_problems
from .config_keys import (
    LENIENT_PREFIXES,
    ConfigError,
    DeclaredKeys,
    check_overrides,
    declared_keys,
    flatten_keys,
    lenient,
    unknown_key_problem,
)
from .data import DatasetError, Normaliser
from .data.groups import GROUP_TRANSFORMS
from .data.partition import PARTITION_TYPES
from .data.raw import SOURCES
from .faults import validate_faults
from .fitness import COLD_STARTS, FITNESS_SOURCES
from .model import DISPATCH_MODES

__all__ = [
    "LENIENT_PREFIXES",
    "SETTINGS",
    "ConfigError",
    "DeclaredKeys",
    "Setting",
    "check_overrides",
    "config_problems",
    "declared_keys",
    "lenient",
    "unchecked_keys",
]

# Groups whose declared keys without a row are accepted unchecked (see module docstring).
UNCHECKED_GROUP_KEYS = ("model",)
STRATEGIES = STRATEGY_NAMES


Check = Callable[[Any, DictConfig], list[str]]


@dataclass(frozen=True)
class Setting:
    """One configuration key and the rule its value must follow.

    Attributes
    ----------
    key : str
        Dotted path (``model.top_k``).
    type : str
        Accepted kinds separated by ``|``: ``int``, ``float`` (an int is accepted),
        ``bool``, ``str``, ``null``, ``list[int]``, ``list[float]``, ``list[str]``,
        ``mapping``.
    range : str, optional
        Interval for numbers (and for every element of a list), in interval notation;
        a bound is a number, ``inf`` or another key: ``"[1, model.num_experts]"``,
        ``"(0, 1]"``.
    choices : tuple of str, optional
        The allowed values of a string.
    meaning : str
        What the setting is, quoted in messages.
    fix : str, optional
        How to fix a bad value; default: ``e.g. <key>=<value in conf/>``.
    required : bool
        Whether a missing key is an error (when ``when`` holds).
    when : str, optional
        ``"key=value"``: the rule applies only when that key holds that value
        (``partition.alpha`` only for ``"partition.type=dirichlet"``).
    check : callable, optional
        ``check(value, cfg) -> problems``: a rule beyond type and range, run only when
        nothing else is wrong under this key.
    """

    key: str
    type: str
    range: str | None = None
    choices: tuple[str, ...] | None = None
    meaning: str = ""
    fix: str | None = None
    required: bool = True
    when: str | None = None
    check: Check | None = None

    def applies(self, cfg: DictConfig) -> bool:
        """Whether the rule applies to ``cfg`` (its ``when`` condition holds)."""
        if self.when is None:
            return True
        key, value = self.when.split("=", 1)
        return OmegaConf.select(cfg, key) == value


# ------------------------------------------------------------------- extra rules
def _non_empty(value: Any, cfg: DictConfig) -> list[str]:
    return [] if len(value) else ["must not be empty"]


def _dir_name(value: Any, cfg: DictConfig) -> list[str]:
    if value is None:
        return []
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        return ["must be a plain folder name (no '/', not '.' or '..')"]
    return []


def _device(value: Any, cfg: DictConfig) -> list[str]:
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return []
    return ["choose auto, cpu, cuda, cuda:N or mps"]


def _three_dims(value: Any, cfg: DictConfig) -> list[str]:
    return [] if len(value) == 3 else ["must be [channels, height, width]"]


def _one_name_per_class(value: Any, cfg: DictConfig) -> list[str]:
    classes = OmegaConf.select(cfg, "dataset.num_classes")
    if value is None or not isinstance(classes, int) or len(value) == classes:
        return []
    return [f"has {len(value)} names for dataset.num_classes={classes}"]


def _preprocess(value: Any, cfg: DictConfig) -> list[str]:
    shape = OmegaConf.select(cfg, "dataset.input_shape")
    if not isinstance(shape, ListConfig) or not shape or not isinstance(shape[0], int):
        return []  # input_shape's own row reports it
    try:
        Normaliser.from_config(value, int(shape[0]))
    except DatasetError as err:
        return [str(err)]
    return []


def _faults(value: Any, cfg: DictConfig) -> list[str]:
    return validate_faults(value)


def _moe_cut(value: Any, cfg: DictConfig) -> list[str]:
    backbone = OmegaConf.select(cfg, "model.backbone")
    if backbone not in BACKBONES:
        return []  # model.backbone's own rule reports it
    return moe_cut_problems(backbone, value)


def _installed(module: str, extra: str, setting: str) -> list[str]:
    """Say how to install an optional extra the setting needs, if it is missing.

    Checked here, once, so that a run does not fail rounds later at the first import.
    """
    if importlib.util.find_spec(module) is None:
        return [f'{setting}=true needs {module}: pip install "flexmoe[{extra}]"']
    return []


def _privacy_needs_mean(value: Any, cfg: DictConfig) -> list[str]:
    method = OmegaConf.select(cfg, "aggregation.method")
    if value and method not in ("auto", "mean"):
        return [
            f"differential privacy calibrates its noise to a mean, not to "
            f"aggregation.method={method}; set aggregation.method=mean or privacy.enabled=false"
        ]
    return _installed("opacus", "privacy", "privacy.enabled") if value else []


def _wandb_installed(value: Any, cfg: DictConfig) -> list[str]:
    return _installed("wandb", "wandb", "wandb.enabled") if value else []


# --------------------------------------------------------------------- the table
S = Setting
SETTINGS: tuple[Setting, ...] = (
    # run
    S("seed", "int", "[0, inf)", meaning="seed of sampling, partitions, initial model"),
    S("num_rounds", "int", "[1, inf)", meaning="federated rounds"),
    S("num_clients", "int", "[1, inf)", meaning="nodes the server waits for"),
    S("fraction_train", "float", "(0, 1]", meaning="share of clients sampled per round"),
    S("min_clients_per_round", "int", "[1, num_clients]", meaning="participants per round"),
    S("output_root", "str", meaning="folder of the run folders", check=_non_empty),
    S(
        "run_name",
        "str|null",
        meaning="the run's folder name",
        fix="a folder name such as run_name=my_run, or null (automatic)",
        check=_dir_name,
    ),
    # capacity
    S("capacity.profile", "str", choices=("constant", "list", "uniform"), meaning="k_c profile"),
    S(
        "capacity.value",
        "int",
        "[1, model.num_experts]",
        meaning="k_c of every client",
        when="capacity.profile=constant",
    ),
    S(
        "capacity.values",
        "list[int]",
        "[1, model.num_experts]",
        meaning="k_c cycled over clients",
        when="capacity.profile=list",
        check=_non_empty,
    ),
    S(
        "capacity.low",
        "int",
        "[1, model.num_experts]",
        meaning="smallest k_c",
        when="capacity.profile=uniform",
    ),
    S(
        "capacity.high",
        "int",
        "[capacity.low, model.num_experts]",
        meaning="largest k_c",
        when="capacity.profile=uniform",
    ),
    # local training
    S(
        "train.new_expert_gate",
        "str",
        choices=("inherit", "keep"),
        meaning="gate row of a newly held expert",
    ),
    S("train.local_epochs", "int", "[1, inf)", meaning="local epochs per round"),
    S("train.batch_size", "int", "[1, inf)", meaning="local batch size"),
    S("train.lr", "float", "(0, inf)", meaning="SGD learning rate"),
    S("train.lr_decay", "float", "(0, 1]", meaning="per-round learning-rate factor"),
    S("train.momentum", "float", "[0, 1)", meaning="SGD momentum"),
    S("train.weight_decay", "float", "[0, inf)", meaning="SGD weight decay"),
    S("train.aux_loss_coef", "float", "[0, inf)", meaning="weight of the balance loss"),
    S("train.device", "str", meaning="training device", check=_device),
    # evaluation
    S("evaluate.every", "int", "[0, inf)", meaning="local evaluation every N rounds, 0: never"),
    S("evaluate.global_every", "int", "[0, inf)", meaning="global test every N rounds, 0: never"),
    S("evaluate.global_max_samples", "int", "[0, inf)", meaning="global test cap, 0: all"),
    # fitness
    S("fitness.source", "str", choices=FITNESS_SOURCES, meaning="where feedback is measured"),
    S("fitness.signal", "str", choices=("loss", "accuracy"), meaning="fitness signal"),
    S("fitness.relative", "bool", meaning="signal relative to the expert's other holders"),
    S("fitness.alpha", "float", "(0, inf)", meaning="temperature of exp(-alpha * loss)"),
    S("fitness.beta", "float", "(0, 1]", meaning="EMA weight of the newest feedback"),
    S("fitness.q0", "float", meaning="initial fitness"),
    S("fitness.cold_start", "str", choices=COLD_STARTS, meaning="a new client's fitness row"),
    S("fitness.decay", "float", "[0, 1]", meaning="decay of unmeasured entries to their start"),
    # aggregation (bounded influence: flexmoe_core.aggregation)
    S(
        "aggregation.expert_weighting",
        "str",
        choices=("usage", "num_examples"),
        meaning="weights of an expert mean",
    ),
    S(
        "aggregation.method",
        "str",
        choices=("auto", "mean", "median", "trimmed_mean"),
        meaning="how updates combine",
    ),
    S("aggregation.trim_fraction", "float", "[0, 0.5)", meaning="share trimmed at each end"),
    S(
        "aggregation.trim_min_holders",
        "int",
        "[3, inf)",
        meaning="holders a group needs before auto trims it",
    ),
    S(
        "aggregation.max_examples_ratio",
        "float|null",
        "[1, inf)",
        meaning="cap on examples, in round medians",
    ),
    S(
        "aggregation.clip_multiple",
        "float|null",
        "[1, inf)",
        meaning="adaptive clip of the backbone, in round low medians of the RMS change",
    ),
    S(
        "aggregation.expert_clip_multiple",
        "float|null",
        "[1, inf)",
        meaning="adaptive clip of an expert (3+ holders), in round low medians",
    ),
    S(
        "aggregation.reject_multiple",
        "float|null",
        "[1, inf)",
        meaning="delta left out above this many round low medians of the RMS change",
    ),
    S(
        "aggregation.max_update_rms",
        "float|null",
        "(0, inf)",
        meaning="clip of the RMS change per group",
    ),
    # differential privacy (flexmoe_core.privacy)
    S("privacy.enabled", "bool", meaning="client-level DP", check=_privacy_needs_mean),
    S("privacy.clip_norm", "float", "(0, inf)", meaning="L2 bound of a client's whole update"),
    S("privacy.noise_multiplier", "float", "[0, inf)", meaning="noise std / clip_norm"),
    S("privacy.delta", "float", "(0, 1)", meaning="delta of the reported (epsilon, delta)"),
    S("privacy.backbone_share", "float", "(0, 1)", meaning="backbone's share of clip_norm^2"),
    # timeouts
    S("timeouts.wait_for_clients_s", "float", "[0, inf)", meaning="wait for nodes at start"),
    S("timeouts.round_s", "float", "(0, inf)", meaning="wait for replies in a round"),
    S(
        "timeouts.rebind_grace_s",
        "float",
        "[0, inf)",
        meaning="wait after a holder is reported unavailable before its key can move",
    ),
    # logging, faults, checkpoints
    S("wandb.enabled", "bool", meaning="W&B logging", check=_wandb_installed),
    S("wandb.project", "str", meaning="W&B project"),
    S("wandb.entity", "str|null", meaning="W&B entity"),
    S("wandb.mode", "str", choices=("offline", "online", "disabled"), meaning="W&B mode"),
    S("wandb.group", "str|null", meaning="W&B group"),
    S("faults.crash_prob", "float", meaning="injected crash probability"),
    S("faults.straggle_prob", "float", meaning="injected straggler probability"),
    S("faults.straggle_s", "float", meaning="delay of an injected straggler"),
    S(
        "faults.max_failed_rounds",
        "int",
        "[0, inf)",
        meaning="rounds without an accepted update before the run stops, 0: never",
    ),
    S(
        "faults.backoff_after",
        "int",
        "[0, inf)",
        meaning="failed rounds in a row before a client is left out, 0: never",
    ),
    S("faults.backoff_rounds", "int", "[1, inf)", meaning="rounds of a client's first pause"),
    S(
        "faults.backoff_max_rounds",
        "int",
        "[faults.backoff_rounds, inf)",
        meaning="longest pause of a failing client",
    ),
    S("faults", "mapping", meaning="failure injection", check=_faults),
    S("checkpoint.enabled", "bool", meaning="write checkpoint.npz every round"),
    S(
        "checkpoint.resume",
        "bool|str|null",
        meaning="resume a run",
        fix="null (a new run), true, or the run folder",
    ),
    S("checkpoint.client_dir", "str|null", meaning="where simulated clients keep gates"),
    # strategy
    S("strategy.name", "str", choices=STRATEGIES, meaning="allocation strategy"),
    S(
        "strategy.epsilon",
        "float",
        "[0, inf)",
        meaning="load band of the LP",
        when="strategy.name=flexmoe",
    ),
    S(
        "strategy.solver",
        "str",
        meaning="auto, flow, cvxpy or a cvxpy solver name",
        when="strategy.name=flexmoe",
        check=_non_empty,
    ),
    S(
        "strategy.deficit_rule",
        "bool",
        meaning="remainder slots to the experts of largest load deficit (epsilon = 0)",
        when="strategy.name=flexmoe",
    ),
    S(
        "strategy.switching_cost",
        "float",
        "[0, inf)",
        meaning="fitness bonus of the experts a client holds now",
        when="strategy.name=flexmoe",
    ),
    S("strategy.tie_noise", "float", "[0, inf)", meaning="tie-breaking noise", required=False),
    # model (rows are optional unless every model needs them: see module docstring)
    S("model.backbone", "str", choices=BACKBONES, meaning="backbone network"),
    S("model.num_experts", "int", "[1, inf)", meaning="E, experts in the layer"),
    S("model.top_k", "int", "[1, model.num_experts]", meaning="experts per sample"),
    S("model.width", "int", "[1, inf)", meaning="backbone width", required=False),
    S("model.feature_dim", "int", "[1, inf)", meaning="feature size", required=False),
    S(
        "model.moe_from",
        "str",
        meaning="first stage of the experts (the MoE cut)",
        fix="pick one of the stages named",
        check=_moe_cut,
    ),
    S("model.dispatch", "str", choices=DISPATCH_MODES, meaning="how experts run on a batch"),
    S("model.pool", "bool", meaning="max-pool after each conv block", required=False),
    # dataset (group-specific keys are optional)
    S("dataset.name", "str", meaning="dataset name", check=_non_empty),
    S("dataset.source", "str", choices=SOURCES, meaning="format of the files"),
    S(
        "dataset.path",
        "str|list[str]|null",
        meaning="local files",
        fix="a folder, archive or glob, a list of them, or null (the Hugging Face Hub)",
    ),
    S("dataset.variant", "str", meaning="EMNIST split", required=False),
    S("dataset.idx_prefix", "str|null", meaning="prefix of idx files", required=False),
    S("dataset.hf.id", "str|null", meaning="Hugging Face dataset id", required=False),
    S("dataset.hf.subset", "str|null", meaning="Hub subset", required=False),
    S("dataset.hf.revision", "str|null", meaning="Hub revision", required=False),
    S("dataset.hf.image_key", "str", meaning="image column", required=False),
    S("dataset.hf.label_key", "str", meaning="label column", required=False),
    S("dataset.split_names.train", "str", meaning="train split name", required=False),
    S("dataset.split_names.test", "str", meaning="test split name", required=False),
    S(
        "dataset.classes",
        "list[str]|null",
        meaning="class names in label order",
        required=False,
        check=_one_name_per_class,
    ),
    S("dataset.num_classes", "int", "[2, inf)", meaning="number of classes"),
    S("dataset.input_shape", "list[int]", "[1, inf)", meaning="[C, H, W]", check=_three_dims),
    S(
        "dataset.test_fraction",
        "float|null",
        "(0, 1)",
        meaning="test share for sources without a test split",
        required=False,
    ),
    S("dataset.label_offset", "int", meaning="subtracted from every label", required=False),
    S(
        "dataset.cache_dir",
        "str|null",
        meaning="decoded-data cache",
        fix="a folder, or null ($FLEXMOE_CACHE_DIR or ~/.cache/flexmoe)",
        required=False,
    ),
    S("dataset.preprocess.mean", "list[float]", meaning="per-channel mean"),
    S("dataset.preprocess.std", "list[float]", "(0, inf)", meaning="per-channel std"),
    S("dataset.preprocess.scale", "float", "(0, inf)", meaning="raw pixel range"),
    S("dataset.preprocess", "mapping", meaning="normalisation", check=_preprocess),
    S(
        "dataset.preprocess.augment",
        "bool|null|mapping",
        meaning="training augmentation (false, true or crop_padding and horizontal_flip)",
        required=False,
    ),
    S(
        "dataset.preprocess.augment.crop_padding",
        "int",
        "[0, inf)",
        meaning="random-crop padding",
        required=False,
    ),
    S(
        "dataset.preprocess.augment.horizontal_flip",
        "bool",
        meaning="random horizontal flip",
        required=False,
    ),
    # partition
    S("partition.type", "str", choices=PARTITION_TYPES, meaning="partitioner"),
    S(
        "partition.alpha",
        "float",
        "(0, inf)",
        meaning="Dirichlet concentration",
        when="partition.type=dirichlet",
    ),
    S(
        "partition.classes_per_client",
        "int",
        "[1, dataset.num_classes]",
        meaning="classes per client",
        when="partition.type=kclass",
    ),
    S(
        "partition.class_assignment",
        "str",
        choices=("first-deterministic", "random", "deterministic"),
        meaning="how classes are dealt",
        required=False,
    ),
    S("partition.min_partition_size", "int", "[0, inf)", meaning="smallest partition"),
    S("partition.self_balancing", "bool", meaning="Dirichlet self-balancing", required=False),
    S("partition.local_test_fraction", "float", "[0, 1)", meaning="local held-out share"),
    S("partition.max_client_samples", "int|null", "[1, inf)", meaning="cap on a client's samples"),
    S("partition.groups.count", "int", "[0, inf)", meaning="client groups (0: none)"),
    S(
        "partition.groups.sizes",
        "list[int]|null",
        "[1, inf)",
        meaning="clients per group",
    ),
    S("partition.groups.transform", "str", choices=GROUP_TRANSFORMS, meaning="group transform"),
)
del S

_BY_KEY = {s.key: s for s in SETTINGS}
assert len(_BY_KEY) == len(SETTINGS), "a key has two rows"


# ------------------------------------------------------------- checking the result
_MISSING = object()
_RANGE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "mapping":
        return isinstance(value, DictConfig | Mapping)
    if kind.startswith("list[") and kind.endswith("]"):
        item = kind[5:-1]
        return isinstance(value, ListConfig | list | tuple) and all(
            _is_kind(v, item) for v in value
        )
    raise ValueError(f"schema: unknown type {kind!r}")


_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "null": "null",
    "mapping": "a mapping",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "list[str]": "a list of strings",
}


def _show(value: Any) -> str:
    """Write ``value`` as a Hydra override would."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def _bound(token: str, cfg: DictConfig) -> tuple[float, str] | None:
    """Return (value, label) of an interval bound; None if a referenced key is invalid."""
    try:
        number = float(token)
    except ValueError:
        ref = OmegaConf.select(cfg, token)
        if isinstance(ref, bool) or not isinstance(ref, int | float):
            return None
        return float(ref), f"{token}={ref}"
    return number, token


def _range_problem(values: Sequence[float], spec: str, cfg: DictConfig) -> str | None:
    match = _RANGE.match(spec)
    if match is None:
        raise ValueError(f"schema: bad range {spec!r}")
    opening, low_token, high_token, closing = match.groups()
    low, high = _bound(low_token, cfg), _bound(high_token, cfg)
    if low is None or high is None:
        return None
    for value in values:
        below = value < low[0] or (opening == "(" and value == low[0])
        above = value > high[0] or (closing == ")" and value == high[0])
        if below or above:
            return f"must be in {opening}{low[1]}, {high[1]}{closing}"
    return None


def _numbers(value: Any) -> list[float]:
    """Return the number, or the numbers of a list, that a range applies to."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    if isinstance(value, ListConfig | list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    return []


def _references(spec: str | None) -> list[str]:
    """Return the keys an interval's bounds refer to."""
    match = _RANGE.match(spec or "")
    tokens = match.groups()[1:3] if match else ()
    return [t for t in tokens if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+|inf)", t)]


def _value_problem(setting: Setting, value: Any, cfg: DictConfig, *, ranged: bool) -> str | None:
    kinds = setting.type.split("|")
    if not any(_is_kind(value, kind) for kind in kinds):
        expected = " or ".join(_NAMES[k] for k in kinds)
        quote = "str" in kinds and not isinstance(value, str | DictConfig | ListConfig)
        hint = f" (quote it: {setting.key}='{_show(value)}')" if quote else ""
        return f"expected {expected}, got {type(value).__name__}{hint}"
    numbers = _numbers(value)
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        return "must be finite"
    if setting.choices is not None and value is not None and value not in setting.choices:
        match = difflib.get_close_matches(str(value), setting.choices, n=1, cutoff=0.5)
        hint = f"did you mean {match[0]!r}? " if match else ""
        return f"{hint}choose one of {', '.join(setting.choices)}"
    if ranged and setting.range is not None and numbers:
        return _range_problem(numbers, setting.range, cfg)
    return None


def _message(setting: Setting, value: Any, problem: str, declared: DeclaredKeys) -> str:
    if setting.type == "mapping":  # a rule over a whole group names its own keys
        return problem
    if setting.fix is not None:
        fix = setting.fix
    elif setting.key in declared.leaves and "${" not in str(declared.leaves[setting.key]):
        fix = f"e.g. {setting.key}={_show(declared.leaves[setting.key])}"
    else:
        fix = "see conf/ for an example"
    meaning = f" ({setting.meaning})" if setting.meaning else ""
    return f"{setting.key}={_show(value)}: {problem}{meaning}; fix: {fix}"


def config_problems(cfg: DictConfig, conf: Path) -> list[str]:
    """Return what is wrong with a composed, resolved configuration (empty if valid)."""
    declared = declared_keys(conf)
    errors: dict[str, str] = {}
    for key, _ in flatten_keys(cfg):
        if not declared.covers(key):
            errors[key] = f"{key}: {unknown_key_problem(key, declared)}"
    checks, cross = [], []
    for setting in SETTINGS:
        if not setting.applies(cfg):
            continue
        value = OmegaConf.select(cfg, setting.key, default=_MISSING)
        if value is _MISSING:
            if setting.required:
                errors[setting.key] = (
                    f"{setting.key} is missing ({setting.meaning}); restore it in conf/ or "
                    "drop the override that removed it"
                )
            continue
        refers = _references(setting.range)
        if problem := _value_problem(setting, value, cfg, ranged=not refers):
            errors[setting.key] = _message(setting, value, problem, declared)
            continue
        if refers:
            cross.append((setting, value, refers))
        if setting.check is not None:
            checks.append((setting, value))
    # A range bounded by another key is checked once that key is known to be valid, so
    # num_experts=0 is one error, not one per key bounded by it.
    for setting, value, refers in cross:
        if any(ref in errors for ref in refers):
            continue
        if problem := _range_problem(_numbers(value), setting.range or "", cfg):
            errors[setting.key] = _message(setting, value, problem, declared)
    for setting, value in checks:
        if any(k == setting.key or k.startswith(setting.key + ".") for k in errors):
            continue
        for problem in setting.check(value, cfg):  # type: ignore[misc]
            errors[setting.key] = _message(setting, value, problem, declared)
    return list(errors.values())


def unchecked_keys(conf: Path) -> list[str]:
    """Return declared keys that have no row (and are not exempt): a test keeps it empty."""
    declared = declared_keys(conf)
    return sorted(
        key
        for key in declared.leaves
        if not lenient(key)
        and not key.startswith(tuple(g + "." for g in UNCHECKED_GROUP_KEYS))
        and not any(key == s.key or key.startswith(s.key + ".") for s in SETTINGS)
    )
