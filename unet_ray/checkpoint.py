"""Training state on disk: written atomically, read back with torch.load(weights_only=True).

A checkpoint is a folder holding `state.pt`: model and optimizer state, the epoch just finished,
its metrics and the run's config. The file is written to a temporary name, flushed and renamed,
so a crash mid-write leaves either the previous file or none, never a half file that looks valid.

Checkpoints are read from local paths and from object storage (storage.py URIs: a checkpoint
folder, its state.pt, or a run / experiment folder whose best.json names one): `fetch` copies a
URI's state.pt into a small local cache (CACHE_ENV, else ~/.cache/unet_ray/checkpoints), one
folder per object version, reused while the object's size and modification time are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from unet_ray import storage

STATE_FILE = "state.pt"
BEST_FILE = "best.json"
FORMAT = "unet_ray.checkpoint/1"
# Where `fetch` keeps local copies of checkpoints in object storage: $UNET_RAY_CACHE_DIR/checkpoints,
# else $XDG_CACHE_HOME/unet_ray/checkpoints (~/.cache/unet_ray/checkpoints).
CACHE_ENV = "UNET_RAY_CACHE_DIR"
# Copies kept: the most recently used ones, and every one used in the last CACHE_KEEP_S (a predict
# run's actors may be loading it right now).
CACHE_MAX_ENTRIES = 8
CACHE_KEEP_S = 3600


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

    A run or experiment folder resolves through the `best.json` that train and tune write. A URI
    (storage.py) is resolved in object storage and its state.pt fetched: the local copy is returned
    (see `fetch`; `locate` gives the URI itself).
    """
    if storage.is_uri(path):
        return fetch(path)
    text = os.fspath(path)
    if isinstance(text, str) and text.lower().startswith("file:"):
        text = storage.resolve(text)[1]
    path = Path(text).expanduser()
    if path.is_dir() and (path / STATE_FILE).is_file():
        return path / STATE_FILE
    if path.is_dir() and (path / BEST_FILE).is_file():
        try:
            best = json.loads((path / BEST_FILE).read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / BEST_FILE} is not a unet_ray summary ({e})") from None
        return resolve(best)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"{path} holds no {STATE_FILE} and no {BEST_FILE}: not a unet_ray checkpoint or run folder")


def locate(path_or_uri: str | os.PathLike) -> str:
    """Where the state.pt of a checkpoint, run or experiment folder is, without copying it: an
    absolute local path, or for a URI the state.pt's URI (best.json followed; its "checkpoint" may
    be a URI or a local path). Problems with the URI itself (a bad URI, a missing bucket, refused
    credentials) are a StorageError; a missing or unusable checkpoint a CheckpointError."""
    if not storage.is_uri(path_or_uri):
        return str(resolve(path_or_uri).resolve())
    uri = os.fspath(path_or_uri)
    shown = storage.redact(uri)
    storage.check(uri, must_exist=False, what="checkpoint")  # bad URI, bucket, credentials: one line
    if storage.is_file(storage.join(uri, STATE_FILE)):
        return storage.join(uri, STATE_FILE)
    best_uri = storage.join(uri, BEST_FILE)
    if storage.is_file(best_uri):
        try:
            best = json.loads(storage.read_text(best_uri))["checkpoint"]
            if not isinstance(best, str) or not best:
                raise ValueError(f"its checkpoint is {best!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{storage.redact(best_uri)} is not a unet_ray summary ({storage.redact(str(e))})") from None
        return locate(best)
    if storage.is_file(uri):
        return uri
    if not storage.exists(uri):
        raise CheckpointError(f"checkpoint {shown} does not exist")
    raise CheckpointError(f"{shown} holds no {STATE_FILE} and no {BEST_FILE}: not a unet_ray checkpoint or run folder")


def fetch(path_or_uri: str | os.PathLike) -> Path:
    """The local state.pt of a checkpoint given as a local path or a URI (see `locate`).

    A URI's state.pt is downloaded once into the cache (cache_dir()): one folder per object and
    version (its URI without credentials, the S3 endpoint, size and modification time), reused
    while those match, so the driver and the actors of a predict run on one machine download it
    once. Written under a temporary name and renamed: concurrent fetches never see half a file.
    The least recently used copies beyond CACHE_MAX_ENTRIES are removed."""
    location = locate(path_or_uri)
    if not storage.is_uri(location):
        return Path(location)
    return _cached_copy(location)


def cache_dir() -> Path:
    """The folder `fetch` keeps checkpoint copies in (see CACHE_ENV)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "checkpoints"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unet_ray" / "checkpoints"


def _cached_copy(uri: str) -> Path:
    import pyarrow as pa
    import pyarrow.fs as pafs

    shown = storage.redact(uri)
    fs, path = storage.resolve(uri)
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        storage.check(uri, what="checkpoint")  # says what is wrong (bucket, credentials), in one line
        reason = storage.redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise CheckpointError(f"checkpoint {shown} cannot be read ({reason})") from None
    if info.type != pafs.FileType.File:
        raise CheckpointError(f"checkpoint {shown} does not exist")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    version = f"{type(fs).__name__}\n{endpoint}\n{shown}\n{info.size}\n{info.mtime_ns}"
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home (a container): the machine's temporary folder
        root = Path(tempfile.gettempdir()) / f"unet_ray-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
    entry = root / hashlib.sha256(version.encode()).hexdigest()[:24]
    target = entry / STATE_FILE
    if target.is_file() and target.stat().st_size == info.size:
        _touch(entry)
        return target
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "source.txt").write_text(shown + "\n")  # for a person looking at the cache; no credentials
    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{os.getpid()}-{threading.get_ident()}-", dir=entry))
    try:
        copied = storage.download(uri, staging)
        if copied.stat().st_size != info.size:
            raise CheckpointError(f"{shown}: downloaded {copied.stat().st_size} bytes of {info.size}; try again")
        os.replace(copied, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _touch(entry)
    _prune(root, keep=entry)
    return target


def _touch(entry: Path) -> None:
    try:
        os.utime(entry)
    except OSError:
        pass


def _prune(root: Path, keep: Path) -> None:
    """Remove the least recently used cache entries beyond CACHE_MAX_ENTRIES, except any used in
    the last CACHE_KEEP_S. Best effort: another process may be pruning too."""
    try:
        entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    now = time.time()
    for entry in entries[CACHE_MAX_ENTRIES:]:
        try:
            if entry != keep and now - entry.stat().st_mtime > CACHE_KEEP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _state_file(path: str | os.PathLike) -> tuple[Path, str]:
    """(local state.pt, how messages name it: the local path, or the redacted URI)."""
    if storage.is_uri(path):
        location = locate(path)
        if storage.is_uri(location):
            return _cached_copy(location), storage.redact(location)
        return Path(location), location
    file = resolve(path)
    return file, str(file)


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint (a local path or a URI); any problem is a CheckpointError naming
    the file (for a URI: the URI, credentials redacted)."""
    file, shown = _state_file(path)
    return _load_file(file, shown, map_location)


def _load_file(file: Path, shown: str, map_location: str | torch.device) -> dict[str, Any]:
    try:
        # Every record of torch.save's zip carries a CRC-32: checked first (~10 ms for 8 MB), as
        # torch.load does not, and damaged weights would otherwise load without a word.
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise CheckpointError(f"{shown} is corrupt: its record {damaged} fails the CRC check")
        state = torch.load(file, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # torch.load's errors on damaged bytes take many types; all mean the same
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{shown} is corrupt or not a PyTorch checkpoint ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{shown} is not a unet_ray checkpoint (no '{FORMAT}' format marker)")
    missing = {"model", "epoch", "config"} - state.keys()
    if missing:
        raise CheckpointError(f"{shown} is missing {', '.join(sorted(missing))}")
    return state


# The settings a checkpoint's weights and optimizer state are shaped by: a run resumed from it must
# ask for the same ones (deep supervision only as on/off: its weight may change, its heads may not)
RESUME_SETTINGS = (
    "data.classes", "data.class_names", "model.depth", "model.base_channels", "model.batch_norm", "model.block",
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
    """(UNet with the checkpoint's weights in eval mode, its TrainConfig, the raw state); `path`
    a local path or a URI."""
    from unet_ray.config import ConfigError, TrainConfig
    from unet_ray.model import build_model, inference_weights

    file, shown = _state_file(path)
    state = _load_file(file, shown, map_location=device)
    try:
        cfg = TrainConfig.from_dict(state["config"], origin=f"config in {shown}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg.model, cfg.num_classes)  # without deep-supervision heads: they only train
    try:
        model.load_state_dict(inference_weights(state["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"{shown}: weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, state
