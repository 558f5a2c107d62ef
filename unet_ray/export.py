"""`unet-ray export`: a checkpoint's UNet as one ONNX or TorchScript file, for serving without
this package.

The exported model is the UNet alone:
    input  "image":  float32 (N, 3, S, S), RGB, scaled to [-1, 1] as value / 127.5 - 1
                     (what engine.to_model_input does to uint8 (N, S, S, 3) photos), S = the
                     checkpoint's image size; N is dynamic
    output "logits": float32 (N, K, S, S); K = 1 for the road task (road where logit > 0), else one
                     logit per class (argmax)
Photos of other sizes are resized to S x S first (area interpolation), as `unet-ray predict` does.
The same description, the image size and the class names are stored in the file's metadata
(ONNX metadata_props; TorchScript extra file `unet_ray.json`).

ONNX goes through torch.export (the `dynamo=True` exporter; needs onnx and onnxscript); the weights
are stored inside the .onnx file. TorchScript goes through torch.jit.trace, which PyTorch has
deprecated: prefer ONNX where the serving side allows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from unet_ray import palette

FORMATS = ("onnx", "torchscript")
FORMAT_MARKER = "unet_ray.export/1"
METADATA_FILE = "unet_ray.json"  # TorchScript extra file holding the metadata
INPUT_NAME, OUTPUT_NAME = "image", "logits"
TRACE_BATCH = 2  # example batch for tracing/exporting; the batch size stays dynamic


class ExportError(ValueError):
    """An export that cannot be done; the message says why and what to install or change."""


def metadata(cfg, state: dict[str, Any], checkpoint: str) -> dict[str, str]:
    """What a server needs to feed the model and read its output (all values strings, as ONNX wants)."""
    height, width = cfg.data.shape
    classes = cfg.class_set
    return {
        "format": FORMAT_MARKER,
        "image_size": str(cfg.data.image_size),
        "classes": cfg.data.classes,
        "class_names": json.dumps(list(classes.names)),
        "class_colors": json.dumps([palette.color_hex(c) for c in classes.colors]),
        "input": f"{INPUT_NAME}: float32 (N, 3, {height}, {width}) RGB in [-1, 1] = uint8 / 127.5 - 1",
        "output": (
            f"{OUTPUT_NAME}: float32 (N, 1, {height}, {width}); class 1 ({classes.names[1]}) where logit > 0"
            if cfg.num_classes == 2
            else f"{OUTPUT_NAME}: float32 (N, {cfg.num_classes}, {height}, {width}); class = argmax over dim 1"
        ),
        "checkpoint": checkpoint,
        "epoch": str(state["epoch"]),
    }


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write the checkpoint's model to `out` as `fmt` (onnx or torchscript); returns the path."""
    from unet_ray.checkpoint import load_model, resolve

    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    model, cfg, state = load_model(checkpoint)
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name (e.g. {out / ('model.' + _suffix(fmt))})")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(TRACE_BATCH, 3, *cfg.data.shape)
    meta = metadata(cfg, state, str(resolve(checkpoint)))
    # Written under a temporary name, renamed when complete: a failed export leaves no half file.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == "onnx":
            _export_onnx(model, example, tmp, meta)
        else:
            _export_torchscript(model, example, tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _suffix(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "pt"


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the onnx and onnxscript packages ({e}); install them with "
            "pip install 'unet_ray[export]'"
        ) from None

    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},  # "x": UNet.forward's argument
            verbose=False,
        )
        # One self-contained file (the default puts weights in a side file); fine below 2 GB.
        program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():
        # UNet.forward checks the input size in Python; the trace records the check as passed,
        # which holds for every (N, 3, S, S) input the exported model is meant for.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit is deprecated in favour of torch.export; the help and README say so.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter logs a warning per missing torchvision op and prints its steps; neither
    concerns a UNet, so keep them out of the user's output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata an exported file carries (ONNX or TorchScript, told apart by content)."""
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # TorchScript files are zip archives; ONNX is protobuf
    if is_zip:
        extra = {METADATA_FILE: ""}
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_FILE])
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
