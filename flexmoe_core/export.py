"""The personalised model out of the federation: trunk + a client's experts + its gate.

A run leaves the global trunk and all E experts in ``<run dir>/final_model.npz``; each
client keeps its private gate under its ``state-dir`` (``<state-dir>/<run name>/
client-<key>/gate-r<round>.npz``, :mod:`flexmoe_core.checkpoint`). The model a client
runs is the trunk, *its* experts and its gate. :func:`load_personalised` rebuilds it
from those files: the newest gate version, and the experts the client held in the
round that gate was trained in (``assignment`` of that round in ``metrics.jsonl``).

:func:`export` wraps it for use outside the framework (:class:`Deployable`): the
input is raw pixels (N, C, H, W) on the dataset's scale (0..255 for 8-bit images),
normalised inside as in training; the output is class logits. Experts are dispatched
densely (every held expert runs, the unchosen are masked), which gives the same
logits as the sparse dispatch of training without its data-dependent control flow, so
one trace serves every input. It is saved as TorchScript (``model.pt``, with the input
shape and class names inside) and, where the ONNX exporter is installed, as ONNX.

``flexmoe-export`` and ``flexmoe-predict`` are the command lines of :func:`export` and
:func:`predict`.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from .data.images import IMAGE_SUFFIXES, decode_image
from .data.sources import Normaliser
from .gate_store import gate_dir, load_gate
from .model import BACKBONE_PREFIX, GATE_PREFIX, MoEClassifier, build_model, split_expert_key
from .results import CONFIG_FILE, METRICS_FILE, MODEL_FILE, read_records
from .settings import DatasetSettings, Settings

TORCHSCRIPT_FILE = "model.pt"
ONNX_FILE = "model.onnx"
META_FILE = "flexmoe.json"  # inside model.pt: input shape, classes, provenance
KIB = 1024


class ExportError(ValueError):
    """The run or the state dir does not hold what a personalised model needs."""


@dataclass
class Personalised:
    """A client's model as the framework runs it, and where its parts came from."""

    model: MoEClassifier
    settings: Settings
    client_key: int
    experts: list[int]
    gate_round: int
    input_shape: tuple[int, int, int]
    num_classes: int
    sizes: dict[str, int] = field(default_factory=dict)  # bytes: trunk, gate, expert, dense


def _read_settings(run_dir: Path) -> Settings:
    """Return the typed settings of the run's ``config.yaml`` (validated when it ran)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}")
    plain = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(plain, dict)
    return Settings.from_dict(plain)


def _client_key(root: Path, client_key: int | None) -> int:
    if client_key is not None:
        return int(client_key)
    keys = sorted(
        int(p.name.split("-", 1)[1])
        for p in root.glob("client-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    if len(keys) != 1:
        found = ", ".join(map(str, keys)) or "none"
        raise ExportError(
            f"{root} holds the gates of clients {found}; name one with --client-key"
            if keys
            else f"{root} holds no client's gate (client-<key> folders): is --state-dir the "
            "SuperNode's state-dir, and did the run set run_name?"
        )
    return keys[0]


def _experts_of(run_dir: Path, key: int, gate_round: int) -> list[int]:
    try:
        records = read_records(run_dir)
    except FileNotFoundError:
        raise ExportError(f"{run_dir} has no {METRICS_FILE}") from None
    for record in records:
        if record.round == gate_round:
            experts = (record.allocation.assignment or {}).get(str(key))
            if experts is None:
                break
            return sorted(int(e) for e in experts)
    raise ExportError(
        f"{run_dir / METRICS_FILE} does not say which experts client {key} held in round "
        f"{gate_round}, the round of its newest gate; is this the run the gate belongs to?"
    )


def _bytes(arrays: dict[str, np.ndarray], prefix: str) -> int:
    return sum(a.nbytes for name, a in arrays.items() if name.startswith(prefix))


def load_personalised(
    run_dir: str | Path, state_dir: str | Path, client_key: int | None = None
) -> Personalised:
    """Rebuild a client's model: the run's trunk and experts, the client's newest gate.

    Parameters
    ----------
    run_dir : path
        The run's output folder (``config.yaml``, ``metrics.jsonl``, ``final_model.npz``).
    state_dir : path
        The SuperNode's ``state-dir`` (or the run's ``checkpoint.client_dir``).
    client_key : int, optional
        Whose model; needed only when the state dir holds several clients' gates.

    Raises
    ------
    ExportError
        If a file is missing or does not fit the others.
    """
    run_dir = Path(run_dir).expanduser()
    settings = _read_settings(run_dir)
    if not settings.run_name:
        raise ExportError(f"{run_dir}/{CONFIG_FILE} sets no run_name: no client kept a gate")
    root = Path(state_dir).expanduser() / settings.run_name
    key = _client_key(root, client_key)
    found = load_gate(gate_dir(state_dir, settings.run_name, key), 10**9)
    if found is None:
        raise ExportError(f"{root / f'client-{key}'} holds no gate version (gate-r<round>.npz)")
    gate_round, stored = found
    gate = {k: v for k, v in stored.items() if k.startswith(GATE_PREFIX)}  # not its metadata
    experts = _experts_of(run_dir, key, gate_round)
    if not (run_dir / MODEL_FILE).is_file():
        raise ExportError(f"{run_dir} has no {MODEL_FILE}: the run has not finished")
    with np.load(run_dir / MODEL_FILE, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    shape = settings.dataset.input_shape
    num_classes = settings.dataset.num_classes
    model = build_model(settings.model, shape, num_classes, experts)
    held = {**gate}
    for name, value in arrays.items():
        parsed = split_expert_key(name)
        if parsed is None or parsed[0] in experts:
            held[name] = value
    state = model.state_dict()
    missing = sorted(set(state) - set(held))
    if missing:
        raise ExportError(f"{MODEL_FILE} and the gate lack {missing[:3]}: not this model")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in held.items()})
    model.eval()
    experts_bytes = [
        sum(a.nbytes for n, a in arrays.items() if (p := split_expert_key(n)) and p[0] == e)
        for e in range(settings.model.num_experts)
    ]
    sizes = {
        "trunk": _bytes(arrays, BACKBONE_PREFIX),
        "gate": _bytes(gate, GATE_PREFIX),
        "expert": max(experts_bytes),
        "held": _bytes(arrays, BACKBONE_PREFIX)
        + _bytes(gate, GATE_PREFIX)
        + sum(experts_bytes[e] for e in experts),
        "dense": _bytes(arrays, BACKBONE_PREFIX) + sum(experts_bytes),
    }
    return Personalised(model, settings, key, experts, gate_round, shape, num_classes, sizes)  # type: ignore[arg-type]


class Deployable(nn.Module):
    """Raw pixels (N, C, H, W) in, class logits out: normalisation + dense dispatch.

    Parameters
    ----------
    model : MoEClassifier
        The personalised model (shared, not copied); run with dense dispatch
        (:meth:`MoEClassifier.logits`).
    normaliser : Normaliser
        The dataset's preprocessing, applied as in training.
    """

    def __init__(self, model: MoEClassifier, normaliser: Normaliser) -> None:
        super().__init__()
        self.model = model
        # The same two float32 operations as Normaliser.__call__, so inputs match bit for bit.
        self.register_buffer(
            "scale", torch.from_numpy((1.0 / (normaliser.scale * normaliser.std)).astype("f4"))
        )
        self.register_buffer(
            "shift", torch.from_numpy((normaliser.mean / normaliser.std).astype("f4"))
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """Return the logits of raw pixels (any dtype; uint8 images work as they are)."""
        x = pixels.to(torch.float32) * self.scale - self.shift
        return self.model.logits(x)


def deployable(personal: Personalised) -> Deployable:
    """Return the personalised model wrapped for export (see :class:`Deployable`)."""
    normaliser = Normaliser.from_settings(
        personal.settings.dataset.preprocess, personal.input_shape[0]
    )
    return Deployable(personal.model, normaliser).eval()


def archive_tensor_bytes(path: str | Path) -> int:
    """Return the bytes of tensor data stored in a TorchScript archive (``data/`` entries)."""
    with zipfile.ZipFile(path) as archive:
        return sum(
            info.file_size
            for info in archive.infolist()
            if "/data/" in info.filename and not info.filename.endswith("/")
        )


@dataclass
class ExportResult:
    """Where the exported files are, and what they hold."""

    torchscript: Path
    onnx: Path | None
    onnx_skipped: str | None
    personal: Personalised


def _class_names(dataset: DatasetSettings) -> list[str]:
    classes = dataset.classes
    if classes and len(classes) == dataset.num_classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(dataset.num_classes)]


def export(
    run_dir: str | Path,
    state_dir: str | Path,
    out_dir: str | Path | None = None,
    client_key: int | None = None,
    onnx: bool = True,
) -> ExportResult:
    """Build the client's personalised model and save it (TorchScript, and ONNX if possible).

    ``out_dir`` defaults to ``<state-dir>/<run name>/client-<key>/export``.
    """
    personal = load_personalised(run_dir, state_dir, client_key)
    module = deployable(personal)
    out = Path(
        out_dir
        or Path(state_dir).expanduser()
        / str(personal.settings.run_name)
        / f"client-{personal.client_key}"
        / "export"
    )
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, *personal.input_shape)
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    meta = {
        "input_shape": list(personal.input_shape),
        "classes": _class_names(personal.settings.dataset),
        "client_key": personal.client_key,
        "experts": personal.experts,
        "num_experts": personal.settings.model.num_experts,
        "gate_round": personal.gate_round,
        "run": str(Path(run_dir).expanduser().resolve()),
    }
    script_path = out / TORCHSCRIPT_FILE
    torch.jit.save(traced, str(script_path), _extra_files={META_FILE: json.dumps(meta)})
    onnx_path, skipped = None, None
    if onnx:
        onnx_path, skipped = _export_onnx(module, example, out / ONNX_FILE)
    return ExportResult(script_path, onnx_path, skipped, personal)


def _export_onnx(module: nn.Module, example: Tensor, path: Path) -> tuple[Path | None, str | None]:
    """Save ONNX with a free batch dimension; return (path, None) or (None, why not)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        return None, (
            f"ONNX skipped: the exporter needs onnx and onnxscript ({err.name} is not "
            'installed: pip install "flexmoe[export]", or on a device the client profile\'s '
            '"<project>/packaging/client[export]")'
        )
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes={"pixels": {0: batch}},
        dynamo=True,
        external_data=False,  # one self-contained file: a device copies one file
        verbose=False,
    )
    return path, None


def size_report(result: ExportResult) -> str:
    """Say what was saved and how its size compares with the dense model's."""
    p = result.personal
    s = p.sizes
    k, e = len(p.experts), p.settings.model.num_experts
    lines = [
        f"client {p.client_key}: experts {p.experts} of {e}, gate of round {p.gate_round}",
        f"TorchScript: {result.torchscript} ({result.torchscript.stat().st_size / KIB:.1f} KiB)",
        f"ONNX: {result.onnx} ({result.onnx.stat().st_size / KIB:.1f} KiB)"
        if result.onnx
        else str(result.onnx_skipped),
        f"parameters: {s['held'] / KIB:.1f} KiB (trunk {s['trunk'] / KIB:.1f} + gate "
        f"{s['gate'] / KIB:.1f} + {k} x expert {s['expert'] / KIB:.1f}) against the dense "
        f"model's {s['dense'] / KIB:.1f} KiB (trunk + {e} experts): "
        f"{100 * s['held'] / s['dense']:.0f}%",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ predict
def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load ``model.pt`` and the metadata saved in it."""
    files = {META_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return module, json.loads(files[META_FILE])


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Return the image files named, and those in the folders named (sorted, recursive)."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found += sorted(
                p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif entry.is_file():
            found.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such file or folder")
    return found


def predict(
    model_path: str | Path, paths: Sequence[str | Path], batch_size: int = 64
) -> list[tuple[Path, str, float]]:
    """Return (file, predicted class, its probability) for every image in ``paths``."""
    module, meta = load_exported(model_path)
    shape, classes = meta["input_shape"], meta["classes"]
    files = image_files(paths)
    out: list[tuple[Path, str, float]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        pixels = np.stack([decode_image(f.read_bytes(), str(f), shape) for f in chunk])
        with torch.no_grad():
            probs = module(torch.from_numpy(pixels)).softmax(-1)
        best = probs.max(-1)
        for f, p, i in zip(chunk, best.values.tolist(), best.indices.tolist(), strict=True):
            out.append((f, classes[i], float(p)))
    return out


# ------------------------------------------------------------ command lines
def export_main(argv: Sequence[str] | None = None) -> int:
    """``flexmoe-export``: save a client's personalised model and print its size."""
    parser = argparse.ArgumentParser(
        prog="flexmoe-export",
        description="Save the model a client runs (trunk + its experts + its gate) as "
        "TorchScript, and ONNX where the exporter is installed.",
    )
    parser.add_argument("--run", required=True, help="the run's output folder")
    parser.add_argument("--state-dir", required=True, help="the SuperNode's state-dir")
    parser.add_argument("--client-key", type=int, help="whose model, if several are kept there")
    parser.add_argument(
        "--out", help="output folder (default <state-dir>/<run>/client-<key>/export)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="TorchScript only")
    args = parser.parse_args(argv)
    try:
        result = export(args.run, args.state_dir, args.out, args.client_key, not args.no_onnx)
    except ExportError as err:
        print(f"flexmoe-export: {err}", file=sys.stderr)
        return 2
    print(size_report(result))
    return 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``flexmoe-predict``: print the predicted class of each image file."""
    parser = argparse.ArgumentParser(
        prog="flexmoe-predict", description="Classify image files with an exported model."
    )
    parser.add_argument("--model", required=True, help="model.pt written by flexmoe-export")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    args = parser.parse_args(argv)
    try:
        results = predict(args.model, args.images)
    except (FileNotFoundError, ValueError) as err:
        print(f"flexmoe-predict: {err}", file=sys.stderr)
        return 2
    for path, label, prob in results:
        print(f"{path}\t{label}\t{prob:.3f}")
    return 0
