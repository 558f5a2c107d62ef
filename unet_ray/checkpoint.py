"""Training state on disk: written atomically, read back with torch.load(weights_only=True).

A checkpoint is a folder holding `state.pt`: model and optimizer state, the epoch just finished,
its metrics and the run's config. The file is written to a temporary name, flushed and renamed,
so a crash mid-write leaves either the previous file or none, never a half file that looks valid.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
FORMAT = "unet_ray.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it."""


def save_state(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / STATE_FILE
    tmp = folder / f".{STATE_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the previous checkpoint as it was
        raise
    _fsync_folder(folder)
    return final


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut. Some file systems refuse fsync on a
    folder; the rename is atomic all the same."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, its state.pt, a training run folder or a Tune experiment -> state.pt.

    A run or experiment folder resolves through the `best.json` that train and tune write.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / STATE_FILE).is_file():
        return path / STATE_FILE
    if path.is_dir() and (path / "best.json").is_file():
        try:
            best = json.loads((path / "best.json").read_text())["checkpoint"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path / 'best.json'} is not a unet_ray summary ({e})") from None
        return resolve(best)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"{path} holds no {STATE_FILE} and no best.json: not a unet_ray checkpoint or run folder")


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; any problem is a CheckpointError naming the file."""
    file = resolve(path)
    try:
        # Every record of torch.save's zip carries a CRC-32: checked first (~10 ms for 8 MB), as
        # torch.load does not, and damaged weights would otherwise load without a word.
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise CheckpointError(f"{file} is corrupt: its record {damaged} fails the CRC check")
        state = torch.load(file, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # torch.load's errors on damaged bytes take many types; all mean the same
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is corrupt or not a PyTorch checkpoint ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a unet_ray checkpoint (no '{FORMAT}' format marker)")
    missing = {"model", "epoch", "config"} - state.keys()
    if missing:
        raise CheckpointError(f"{file} is missing {', '.join(sorted(missing))}")
    return state


# The settings a checkpoint's weights and optimizer state are shaped by: a run resumed from it must
# ask for the same ones (deep supervision only as on/off: its weight may change, its heads may not)
RESUME_SETTINGS = (
    "data.classes", "model.depth", "model.base_channels", "model.batch_norm", "model.block",
    "model.upsample", "model.deep_supervision", "optim.optimizer",
)  # fmt: skip


def _resume_setting(cfg: dict[str, Any], key: str) -> Any:
    from unet_ray.config import TrainConfig

    section, name = key.split(".")
    # a key that a checkpoint of an older version lacks: that version behaved as today's default
    value = cfg.get(section, {}).get(name, getattr(getattr(TrainConfig(), section), name))
    if key == "model.deep_supervision":
        return "on" if value else "off"
    return value


def latest_checkpoint(run_folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder of a `unet-ray train` run (Ray Train names them by time), the one a
    re-run with the same name resumes from; None when the run has none yet."""
    folders = sorted(p.parent for p in Path(run_folder).glob(f"checkpoint_*/{STATE_FILE}"))
    return folders[-1] if folders else None


def resume_conflicts(saved_config: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The RESUME_SETTINGS in which `config` (TrainConfig.to_dict) differs from a checkpoint's
    saved config, as "key: checkpoint X, this run Y"; empty when it can be resumed."""
    conflicts = []
    for key in RESUME_SETTINGS:
        saved, wanted = _resume_setting(saved_config, key), _resume_setting(config, key)
        if saved != wanted:
            conflicts.append(f"{key}: checkpoint {saved}, this run {wanted}")
    return conflicts


def check_resumable(run_folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Before any Ray work: a run whose folder already holds a checkpoint resumes from it, which
    only works with the settings that shaped its weights. Otherwise a CheckpointError names them
    (not a state-dict error deep in every worker, retried max_failures times)."""
    latest = latest_checkpoint(run_folder)
    if latest is None:
        return
    try:
        state = load_state(latest)
    except CheckpointError:
        return  # damaged: the resume fails in the worker, whose error names the file (as for any run)
    conflicts = resume_conflicts(state["config"], config)
    if conflicts:
        raise CheckpointError(
            f"{Path(run_folder)} already has a checkpoint (epoch {state['epoch']}) that this run would resume "
            f"from, and it was trained with other settings ({'; '.join(conflicts)}). Resume with the "
            "checkpoint's settings, or start a new run with another --name"
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(UNet with the checkpoint's weights in eval mode, its TrainConfig, the raw state)."""
    from unet_ray.config import ConfigError, TrainConfig
    from unet_ray.model import build_model, inference_weights

    state = load_state(path, map_location=device)
    try:
        cfg = TrainConfig.from_dict(state["config"], origin=f"config in {resolve(path)}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg.model, cfg.num_classes)  # without deep-supervision heads: they only train
    try:
        model.load_state_dict(inference_weights(state["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"{resolve(path)}: weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, state
