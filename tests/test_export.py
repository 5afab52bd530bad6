"""The personalised model out of the federation: export, equality with the framework, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import as_settings, fast_config, initial_arrays, make_grid, node_configs

from flexmoe_core.data import load_client_data
from flexmoe_core.data.sources import Normaliser
from flexmoe_core.export import (
    ExportError,
    archive_tensor_bytes,
    export,
    export_main,
    load_exported,
    load_personalised,
    predict_main,
)
from flexmoe_core.results import RunRecorder, read_metrics
from server_app.strategy import FlexMoEStrategy, to_array_record

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLIENTS = 3


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-round run whose clients keep their gates in a state dir, with its run folder."""
    tmp = tmp_path_factory.mktemp("export")
    run_dir, state_dir = tmp / "run", tmp / "state"
    cfg = fast_config(
        "run_name=exported capacity.profile=list capacity.values=[1,2,3]",
        num_clients=NUM_CLIENTS,
        num_rounds=2,
    )
    run_dir.mkdir()
    recorder = RunRecorder(run_dir, as_settings(cfg))
    grid = make_grid(
        NUM_CLIENTS, configs=node_configs(NUM_CLIENTS, **{"state-dir": str(state_dir)})
    )
    strategy = FlexMoEStrategy(as_settings(cfg), recorder)
    strategy.start(grid, to_array_record(initial_arrays(cfg)), num_rounds=2, timeout=60)
    recorder.save_model(strategy.global_arrays)
    return cfg, run_dir, state_dir


def held_out_pixels(cfg, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the client's held-out split as raw pixels (and its normalised images)."""
    data = load_client_data(
        as_settings(cfg).dataset, as_settings(cfg).partition, key, NUM_CLIENTS, int(cfg.seed)
    )
    norm = Normaliser.from_config(cfg.dataset.preprocess, 1)
    # The split holds 8-bit-like integers normalised: undo it and round back to them.
    pixels = np.rint(data.local_test.x * norm.std * norm.scale + norm.mean * norm.scale)
    np.testing.assert_array_equal(norm(pixels), data.local_test.x)  # exactly those images
    return pixels.astype(np.float32), data.local_test.x


@pytest.mark.parametrize("key", [1, 2])
def test_exported_model_predicts_as_the_personalised_model(finished_run, tmp_path, key) -> None:
    cfg, run_dir, state_dir = finished_run
    result = export(run_dir, state_dir, tmp_path / "out", client_key=key, onnx=False)
    personal = result.personal
    last = read_metrics(run_dir)[-1]
    assert personal.gate_round == last["round"] == 2
    assert personal.experts == last["assignment"][str(key)] and len(personal.experts) == key + 1
    pixels, normalised = held_out_pixels(cfg, key)
    with torch.no_grad():
        framework = personal.model(torch.from_numpy(normalised)).logits  # sparse dispatch
        module, meta = load_exported(result.torchscript)
        exported = module(torch.from_numpy(pixels))
    assert meta["experts"] == personal.experts and meta["input_shape"] == [1, 8, 8]
    assert torch.equal(exported.argmax(-1), framework.argmax(-1))
    torch.testing.assert_close(exported, framework, rtol=1e-5, atol=1e-5)
    # The client's own gate is in it: another gate changes the logits.
    other = load_personalised(run_dir, state_dir, client_key=0)
    assert not torch.equal(other.model.gate.weight, personal.model.gate.weight)


def test_export_holds_the_trunk_the_gate_and_k_experts_only(finished_run, tmp_path) -> None:
    _, run_dir, state_dir = finished_run
    for key in range(NUM_CLIENTS):
        result = export(run_dir, state_dir, tmp_path / str(key), client_key=key, onnx=False)
        s, k = result.personal.sizes, len(result.personal.experts)
        stored = archive_tensor_bytes(result.torchscript)
        # Tensor data: trunk + gate + k experts (+ the normalisation's two tiny buffers
        # and the assigned-expert index), never another expert.
        assert s["held"] <= stored <= s["held"] + 64
        assert stored < s["trunk"] + s["gate"] + (k + 1) * s["expert"]
        assert s["held"] < s["dense"]


def test_export_and_predict_command_lines(finished_run, tmp_path, capsys) -> None:
    cfg, run_dir, state_dir = finished_run
    out = tmp_path / "model"
    code = export_main(
        [
            "--run",
            str(run_dir),
            "--state-dir",
            str(state_dir),
            "--client-key",
            "1",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "experts" in printed and "against the dense model's" in printed
    assert "TorchScript:" in printed and "ONNX" in printed  # saved, or skipped saying why
    pixels, _ = held_out_pixels(cfg, 1)
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(pixels[:5]):
        Image.fromarray(image[0].astype(np.uint8), mode="L").save(folder / f"{i}.png")
    assert predict_main(["--model", str(out / "model.pt"), str(tmp_path / "images")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    module, _ = load_exported(out / "model.pt")
    expected = module(torch.from_numpy(pixels[:5])).argmax(-1).tolist()
    assert [line.split("\t")[1] for line in lines] == [str(c) for c in expected]


def test_export_says_what_is_missing(finished_run, tmp_path, capsys) -> None:
    _, run_dir, state_dir = finished_run
    with pytest.raises(ExportError, match="--client-key"):
        load_personalised(run_dir, state_dir)  # three clients' gates there
    with pytest.raises(ExportError, match="no client's gate"):
        load_personalised(run_dir, tmp_path)
    assert export_main(["--run", str(tmp_path), "--state-dir", str(state_dir)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_onnx_export_where_the_exporter_is_installed(finished_run, tmp_path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    _, run_dir, state_dir = finished_run
    result = export(run_dir, state_dir, tmp_path, client_key=2)
    assert result.onnx is not None and result.onnx_skipped is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model.onnx")] == [
        "model.onnx"
    ]  # one file, the weights inside
    graph = onnx.load(str(result.onnx)).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert json.loads(json.dumps(result.personal.experts)) == result.personal.experts
