"""`unet-ray export`: ONNX (run with onnxruntime) and TorchScript files give PyTorch's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_ray import checkpoint as ckpt_io
from unet_ray import export
from unet_ray.cli import main
from unet_ray.config import TrainConfig
from unet_ray.engine import to_model_input
from unet_ray.model import build_model, out_channels

# label set -> logits per pixel: road is one logit (road where > 0), cityscapes19 one per class
LOGITS = {"cityscapes19": 19, "road": 1}


@pytest.fixture(scope="module", params=list(LOGITS))
def checkpoint(request, tmp_path_factory):
    """A checkpoint of each label set whose BatchNorm statistics are not the defaults (so eval mode matters)."""
    cfg = TrainConfig.from_dict(
        {"data": {"image_size": 64, "classes": request.param}, "model": {"depth": 2, "base_channels": 4}}
    ).validate()
    assert out_channels(cfg.num_classes) == LOGITS[request.param]
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 0.7 + 0.2)
    folder = tmp_path_factory.mktemp(f"export_{request.param}") / "ckpt"
    ckpt_io.save_state(folder, {"model": model.state_dict(), "epoch": 2, "config": cfg.to_dict(), "metrics": {}})
    return folder


def _inputs(batch: int) -> torch.Tensor:
    """Real preprocessing of random uint8 photos, as `unet-ray predict` feeds the model."""
    photos = torch.from_numpy(np.random.default_rng(batch).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8))
    return to_model_input(photos, torch.device("cpu"))


def _label_set(checkpoint) -> str:
    return ckpt_io.load_model(checkpoint)[1].data.classes


def _reference(checkpoint, x: torch.Tensor) -> np.ndarray:
    model, _, _ = ckpt_io.load_model(checkpoint)
    with torch.no_grad():
        return model(x).numpy()


def test_onnx_export_matches_pytorch(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert f"exported onnx model to {out}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [out]  # one self-contained file, no side .data file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    label_set = _label_set(checkpoint)
    k = LOGITS[label_set]
    assert export.TRACE_BATCH not in (1, 3)  # batch sizes other than the exported one: N is dynamic
    for batch in (1, 3):
        x = _inputs(batch)
        (logits,) = session.run(None, {"image": x.numpy()})
        assert logits.shape == (batch, k, 64, 64)
        np.testing.assert_allclose(logits, _reference(checkpoint, x), atol=1e-4, rtol=0)
    meta = export.read_metadata(out)
    assert meta["image_size"] == "64" and meta["classes"] == label_set and "[-1, 1]" in meta["input"]
    assert f"(N, {k}, 64, 64)" in meta["output"]
    assert ("class 1 (road) where logit > 0" in meta["output"]) == (k == 1)


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path):
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    loaded = torch.jit.load(str(out), map_location="cpu")
    label_set = _label_set(checkpoint)
    k = LOGITS[label_set]
    for batch in (1, 3):
        x = _inputs(batch)
        with torch.no_grad():
            logits = loaded(x).numpy()
        assert logits.shape == (batch, k, 64, 64)
        np.testing.assert_allclose(logits, _reference(checkpoint, x), atol=1e-4, rtol=0)
    meta = export.read_metadata(out)
    assert meta["epoch"] == "2" and ("argmax" in meta["output"]) == (k == 19)


def test_export_errors_name_the_problem(checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
