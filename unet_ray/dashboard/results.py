"""Read a Ray Tune experiment folder (made by `unet-ray tune`), or a train run's folder (made by
`unet-ray train`: best.json, history.jsonl, checkpoints), into plain, JSON-ready data. A train
run is shown as a sweep of one trial (`Snapshot.kind == "run"`), so both share one page.

Sources, and why each:
- `experiment_state-*.json` (Tune's controller state, rewritten at least every ~10 s while the
  sweep runs): every trial, pending ones included, with its status and folder.
- each trial folder: `params.json` (the searched values), `result.json` (Tune's report lines: the
  `done` flag, `time_total_s`) and `error.txt` for errored trials.
- `runs/<trial_id>/history.jsonl` (our Train callback): the complete per-epoch record. Tune
  restarts a resumed trial's result.json, so only the history has every epoch; result.json is the
  fallback for curves when a history is missing.
- `best.json`, written when the sweep ends; while it runs the best trial is worked out here the
  same way (highest val_iou, checkpoint of the history row that reached it).

Paths recorded in those files are absolute on the machine that ran the sweep; `relocate` maps
them into this experiment folder so that a copied sweep still shows its predictions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from unet_ray import storage
from unet_ray.runfiles import BEST_FILE, HISTORY_FILE, RUNS_DIR

STATE_GLOB = "experiment_state-*.json"
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
# Tune rewrites experiment_state-*.json every 10 s or more often while its controller runs; a
# folder untouched for this long belongs to a sweep that is not running any more.
LIVE_SECONDS = 90.0
STATE_READ_ATTEMPTS = 3
MAX_ERROR_CHARS = 20_000  # a traceback longer than this is shown by its end
# "run_trial_e21eb_00003_3_depth=3,lr=0.0055_2026-..." -> "e21eb_00003"
TRIAL_ID_IN_FOLDER = re.compile(r"_([0-9a-f]{5}_\d{5})_\d+")
# Files of a trial that the dashboard links to (served read-only by the server's /files/ route).
TRIAL_FILES = (PARAMS_FILE, RESULT_FILE, "progress.csv", ERROR_FILE)

# Trial statuses shown on the page.
FINISHED = "finished"
STOPPED = "stopped early"  # ASHA ended it before the last epoch
RUNNING = "running"
PENDING = "pending"
PAUSED = "paused"
ERRORED = "errored"
INTERRUPTED = "interrupted"  # unfinished in a sweep that is not running: `unet-ray tune --resume`


class DashboardError(ValueError):
    """A results folder the dashboard cannot show; the message names it and says why."""


@dataclass
class Trial:
    trial_id: str
    status: str = PENDING
    params: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None  # relative to the experiment folder
    epochs: int = 0  # epochs run (distinct epochs in the history)
    last_epoch: int | None = None
    best_val_iou: float | None = None
    best_epoch: int | None = None
    last_val_iou: float | None = None
    time_s: float | None = None
    error: str | None = None  # error.txt text (its end when long)
    files: list[str] = field(default_factory=list)  # relative paths the page links to
    curve: list[dict[str, Any]] = field(default_factory=list)  # per epoch: epoch, val_iou, train_loss
    checkpoint: str | None = None  # checkpoint of the best epoch, relocated; None when missing


@dataclass
class Snapshot:
    name: str
    path: str
    sweep_status: str  # running | finished | stopped (not running, trials unfinished: resume it)
    updated: float | None  # newest modification time of the files read (epoch seconds)
    max_epochs: int | None
    settings: dict[str, Any]  # fixed settings of the sweep, from a trial's checkpoint config
    param_keys: list[str]
    trials: list[Trial]  # best first
    best: dict[str, Any] | None
    prepared: str | None
    warnings: list[str]
    kind: str = "sweep"  # "sweep" (a Tune experiment) or "run" (one `unet-ray train` run)
    per_class: dict[str, Any] | None = None  # runs: IoU per class at the best and last epoch

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for trial in data["trials"]:
            trial.pop("checkpoint")  # absolute paths of this machine: not for the page
        if data["best"]:
            data["best"].pop("checkpoint_path", None)
        data.pop("prepared")
        return data


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


def check_experiment(path: str | os.PathLike) -> Path:
    """The resolved experiment folder, or a DashboardError that says what is wrong with it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DashboardError(f"results folder {path} does not exist")
    if not path.is_dir():
        raise DashboardError(f"{path} is a file; --results takes a Tune experiment or train run folder (<storage>/<name>)")
    if _looks_like_experiment(path) or is_train_run(path):
        return path.resolve()
    inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (_looks_like_experiment(p) or is_train_run(p)))
    hint = f"; it holds the result folder(s) {', '.join(inside)}: pass {path / inside[0]}" if inside else ""
    raise DashboardError(
        f"{path} is not a Ray Tune experiment folder (no {STATE_GLOB} and no trial folders with "
        f"{PARAMS_FILE}) nor a train run folder (no {HISTORY_FILE}){hint}"
    )


def _looks_like_experiment(path: Path) -> bool:
    return any(path.glob(STATE_GLOB)) or any(path.glob(f"*/{PARAMS_FILE}"))


def is_train_run(path: Path) -> bool:
    """A `unet-ray train` run folder: its history at the top, and no Tune files."""
    return (path / HISTORY_FILE).is_file() and not _looks_like_experiment(path)


def fingerprint(experiment: Path) -> str:
    """Changes whenever a file the snapshot reads changes: lets the server reuse its last answer."""
    digest = hashlib.sha1()
    for pattern in (STATE_GLOB, BEST_FILE, HISTORY_FILE, f"*/{PARAMS_FILE}", f"*/{RESULT_FILE}", f"*/{ERROR_FILE}",
                    f"{RUNS_DIR}/*/{HISTORY_FILE}"):
        for file in sorted(experiment.glob(pattern)):
            try:
                st = file.stat()
            except FileNotFoundError:  # removed between glob and stat (Tune replaces files)
                continue
            digest.update(f"{file}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return digest.hexdigest()


def relocate(recorded: str | None, experiment: Path) -> Path | str | None:
    """A path recorded by the sweep -> the same file in this experiment folder, if it is there.

    `/old/storage/smoke/runs/t1/checkpoint_x` becomes `<experiment>/runs/t1/checkpoint_x`: the
    longest tail of the recorded path that exists inside the experiment folder wins, so a sweep
    copied elsewhere finds its own checkpoints. The recorded path itself is the last resort. A
    URI (a run on object storage) is kept as it is; it is not looked up.
    """
    if not recorded:
        return None
    if storage.is_uri(recorded):
        return recorded
    path = Path(recorded)
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for i in range(len(parts)):
        candidate = experiment.joinpath(*parts[i:])
        if candidate.exists():
            return candidate
    return path if path.exists() else None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file. The last line may be half written while a trial runs: it is left
    out silently; a broken line before it is reported."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number < len(lines):
                warnings.append(f"{path}: line {number} is not JSON; left out")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path, warnings: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        warnings.append(f"{path} is not valid JSON ({e}); left out")
        return None


def _read_state(experiment: Path, warnings: list[str]) -> tuple[dict[str, dict[str, Any]], float | None]:
    """{trial_id: {status, config, folder, error_file, last_result}} from the newest Tune state file
    (a resumed sweep writes a new one), and that file's modification time."""
    files = []
    for f in experiment.glob(STATE_GLOB):
        try:
            files.append((f.stat().st_mtime, f))
        except FileNotFoundError:
            continue
    if not files:
        return {}, None
    mtime, newest = max(files)
    # Tune copies the file into place from a staging folder: a read can catch it half copied.
    for attempt in range(STATE_READ_ATTEMPTS):
        try:
            state = json.loads(newest.read_text())
            break
        except (ValueError, FileNotFoundError) as e:
            if attempt == STATE_READ_ATTEMPTS - 1:
                warnings.append(f"{newest} could not be read ({e}); statuses come from the trial folders")
                return {}, mtime
            time.sleep(0.2)
    trials: dict[str, dict[str, Any]] = {}
    try:
        for trial_json, runtime_json in state["trial_data"]:
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            trials[trial["trial_id"]] = {
                "status": trial.get("status"),
                "config": trial.get("config") or {},
                "folder": trial.get("relative_logdir"),
                "error_file": runtime.get("error_filename"),
                "last_result": runtime.get("last_result") or {},
            }
    except (TypeError, KeyError, ValueError) as e:
        warnings.append(f"{newest}: unexpected layout ({type(e).__name__}: {e}); statuses come from the trial folders")
        return {}, mtime
    return trials, mtime


def _trial_folders(experiment: Path, warnings: list[str]) -> dict[str, Path]:
    """{trial_id: folder} for every folder holding a trial's params.json or result.json."""
    folders = {}
    for folder in sorted(p for p in experiment.iterdir() if p.is_dir()):
        if not ((folder / PARAMS_FILE).is_file() or (folder / RESULT_FILE).is_file()):
            continue
        match = TRIAL_ID_IN_FOLDER.search(folder.name)
        if match:
            trial_id = match.group(1)
        else:
            first = read_jsonl(folder / RESULT_FILE, warnings)[:1]
            trial_id = first[0].get("trial_id", folder.name) if first else folder.name
        folders[trial_id] = folder
    return folders


def _flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(params, dict):
        return {}
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _by_epoch(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch (a restarted run that re-reports an epoch: its last report wins)."""
    latest = {}
    for row in rows:
        if isinstance(row.get("epoch"), (int, float)):
            latest[int(row["epoch"])] = row
    return [latest[e] for e in sorted(latest)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _read_error(file: Path) -> str:
    text = file.read_text(errors="replace")
    if len(text) > MAX_ERROR_CHARS:
        text = f"[... {len(text) - MAX_ERROR_CHARS} characters left out; the whole text is in {file}]\n" + text[-MAX_ERROR_CHARS:]
    return text


@lru_cache(maxsize=64)
def _checkpoint_config(state_file: str, mtime_ns: int) -> dict[str, Any] | None:
    """The TrainConfig dict stored in a checkpoint (memory-mapped: the weights are not read)."""
    import torch

    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file simply gives no settings
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def _sweep_settings(trials: list[Trial]) -> dict[str, Any]:
    """Fixed settings of the sweep (epochs, image size, classes, workers) from any trial's
    checkpoint: every trial shares them, only the searched keys differ."""
    for trial in trials:
        config = _run_config(trial)
        if config:
            data, model, optim, run = (config.get(k, {}) for k in ("data", "model", "optim", "run"))
            return {
                "epochs": optim.get("epochs"),
                "image_size": data.get("image_size"),
                "classes": data.get("classes"),
                "workers per trial": run.get("workers"),
                "gpu": run.get("gpu"),
                "batch_size": optim.get("batch_size"),
                "lr": optim.get("lr"),
                "depth": model.get("depth"),
                "base_channels": model.get("base_channels"),
            }
    return {}


def _run_config(trial: Trial) -> dict[str, Any] | None:
    """The TrainConfig dict stored in the trial's best checkpoint, if it is on disk."""
    from unet_ray.checkpoint import STATE_FILE

    state_file = Path(trial.checkpoint) / STATE_FILE if trial.checkpoint else None
    if state_file is None or not state_file.is_file():
        return None
    return _checkpoint_config(str(state_file), state_file.stat().st_mtime_ns)


def _param_order(keys) -> list[str]:
    """Searched keys in the order `unet_ray.config.SEARCHABLE` lists them, any others after, sorted."""
    from unet_ray.config import SEARCHABLE

    distinct = set(keys)
    return [k for k in SEARCHABLE if k in distinct] + sorted(distinct - set(SEARCHABLE))


def _trial_status(
    tune_status: str | None, errored: bool, done: bool, last_epoch: int | None, max_epochs: int | None,
    has_results: bool, live: bool,
) -> str:
    # error.txt stays in the folder of a trial that Tune resumed (resume_errored) and that ran on or
    # finished: it counts only when Tune has no status for the trial (state file missing or unreadable).
    if tune_status == "ERROR" or (errored and tune_status is None):
        return ERRORED
    if done or tune_status == "TERMINATED":
        # TERMINATED with no report carrying `done` ended all the same: its epochs tell which way
        return STOPPED if max_epochs is not None and last_epoch is not None and last_epoch < max_epochs else FINISHED
    if tune_status == "PAUSED":
        return PAUSED if live else INTERRUPTED
    if tune_status == "RUNNING" or has_results:
        return RUNNING if live else INTERRUPTED
    return PENDING


def _read_trial(
    experiment: Path, trial_id: str, info: dict[str, Any], folder: Path | None, warnings: list[str], mtimes: list[float]
) -> tuple[Trial, bool]:
    """A trial's record (status still unset) and whether Tune marked it done; appends the
    modification times of the files read to `mtimes`."""
    if folder is not None and not folder.is_dir():
        folder = None  # a pending trial: Tune makes its folder when it starts
    trial = Trial(trial_id, folder=folder.name if folder else None)
    results = read_jsonl(folder / RESULT_FILE, warnings) if folder else []
    history_file = experiment / RUNS_DIR / trial_id / HISTORY_FILE
    rows = _by_epoch(read_jsonl(history_file, warnings)) or _by_epoch(results)
    for file in (history_file, folder / RESULT_FILE if folder else None):
        if file is not None and file.is_file():
            mtimes.append(file.stat().st_mtime)

    params = info.get("config") or (_read_json(folder / PARAMS_FILE, warnings) if folder else None)
    trial.params = _flatten(params)
    last = results[-1] if results else info.get("last_result", {})
    trial.time_s = _number(last.get("time_total_s"))
    _apply_history(trial, rows, experiment)
    if folder is not None:
        trial.files = [f"{folder.name}/{name}" for name in TRIAL_FILES if (folder / name).is_file()]
        if (folder / ERROR_FILE).is_file():
            trial.error = _read_error(folder / ERROR_FILE)
    if history_file.is_file():
        trial.files.append(f"{RUNS_DIR}/{trial_id}/{HISTORY_FILE}")
    return trial, bool(last.get("done"))


CURVE_METRICS = ("val_iou", "train_loss", "val_miou", "val_dice", "val_pixel_accuracy")


def _apply_history(trial: Trial, rows: list[dict[str, Any]], experiment: Path) -> dict[str, Any] | None:
    """Fill the trial's curve, epochs, best and last IoU and best checkpoint from its history rows
    (one per epoch); returns the best row."""
    if trial.time_s is None and rows:
        trial.time_s = sum(_number(r.get("epoch_seconds")) or 0.0 for r in rows)
    trial.curve = [{"epoch": int(r["epoch"]), **{m: _number(r.get(m)) for m in CURVE_METRICS}} for r in rows]
    trial.epochs, trial.last_epoch = len(rows), (int(rows[-1]["epoch"]) if rows else None)
    scored = [r for r in rows if _number(r.get("val_iou")) is not None]
    if not scored:
        return None
    best_row = max(scored, key=lambda r: r["val_iou"])  # the first of equals, as tune.py picks
    trial.best_val_iou, trial.best_epoch = float(best_row["val_iou"]), int(best_row["epoch"])
    trial.last_val_iou = _number(scored[-1]["val_iou"])
    trial.checkpoint = _best_checkpoint(scored, trial.best_val_iou, experiment)
    return best_row


def read_experiment(path: str | os.PathLike, now: float | None = None) -> Snapshot:
    """Everything the page shows about the experiment (or train run), read afresh from its files."""
    experiment = check_experiment(path)
    now = time.time() if now is None else now
    if is_train_run(experiment):
        return read_run(experiment, now)
    warnings: list[str] = []
    state, state_mtime = _read_state(experiment, warnings)
    folders = _trial_folders(experiment, warnings)
    best_file = experiment / BEST_FILE
    best_json = _read_json(best_file, warnings) if best_file.is_file() else None

    mtimes = [m for m in (state_mtime,) if m is not None]
    trials: list[Trial] = []
    done_flags: dict[str, bool] = {}
    tune_statuses: dict[str, str | None] = {}
    for trial_id in list(state) + [t for t in folders if t not in state]:
        info = state.get(trial_id, {})
        folder = folders.get(trial_id) or (experiment / info["folder"] if info.get("folder") else None)
        trial, done_flags[trial_id] = _read_trial(experiment, trial_id, info, folder, warnings, mtimes)
        tune_statuses[trial_id] = info.get("status")  # the trial's status is worked out once liveness is known
        trials.append(trial)

    updated = max(mtimes) if mtimes else None
    best_mtime = best_file.stat().st_mtime if best_json is not None else None
    # best.json newer than Tune's state: the sweep ended (a resumed sweep rewrites the state).
    ended = best_mtime is not None and (state_mtime is None or best_mtime >= state_mtime)
    live = not ended and updated is not None and now - updated < LIVE_SECONDS
    keys = _param_order(k for t in trials for k in t.params)
    settings = {k: v for k, v in _sweep_settings(sorted(trials, key=lambda t: t.trial_id)).items() if k not in keys}
    max_epochs = settings.get("epochs")
    if max_epochs is None:  # no checkpoint to read it from: the furthest an ended trial has gone
        completed = {t for t, done in done_flags.items() if done or tune_statuses[t] == "TERMINATED"}
        max_epochs = max((t.last_epoch for t in trials if t.trial_id in completed and t.last_epoch), default=None)
    for trial in trials:
        trial.status = _trial_status(
            tune_statuses[trial.trial_id], trial.error is not None, done_flags[trial.trial_id], trial.last_epoch,
            max_epochs, bool(trial.curve), live,
        )
        if trial.status != ERRORED and trial.error is not None:
            trial.error = None  # an earlier failure of a trial that was resumed and runs again or ended
    _rank(trials)

    if live:
        sweep_status = "running"
    elif ended or (trials and all(t.status in (FINISHED, STOPPED, ERRORED) for t in trials)):
        sweep_status = "finished"
    else:
        sweep_status = "stopped"
    prepared = relocate((best_json or {}).get("prepared"), experiment) or (
        experiment / "prepared" if (experiment / "prepared").is_dir() else None
    )
    best = _pick_best(trials, best_json, experiment)
    _rank(trials, best["trial_id"] if best else None)
    return Snapshot(
        name=experiment.name,
        path=str(experiment),
        sweep_status=sweep_status,
        updated=updated,
        max_epochs=max_epochs,
        settings=settings,
        param_keys=keys,
        trials=trials,
        best=best,
        prepared=str(prepared) if prepared else None,
        warnings=warnings,
    )


def _rank(trials: list[Trial], best_id: str | None = None) -> None:
    """Highest best val_iou first (between equals the chosen best trial), trials without one last."""
    trials.sort(key=lambda t: (t.best_val_iou is None, -(t.best_val_iou or 0.0), t.trial_id != best_id, t.trial_id))


def _best_checkpoint(scored: list[dict[str, Any]], best: float, experiment: Path) -> str | None:
    """Checkpoint of the history row that reached `best`; of equal rows the first still on disk
    (Ray Train keeps only the best few checkpoints)."""
    for row in scored:
        if row["val_iou"] == best:
            found = relocate(row.get("checkpoint"), experiment)
            if found is not None:
                return str(found)
    return None


def _pick_best(trials: list[Trial], best_json: Any, experiment: Path) -> dict[str, Any] | None:
    """best.json's choice while it agrees with the histories (between equal trials it decides),
    else the highest val_iou so far (a resumed sweep runs on past its old best.json)."""
    scored = [t for t in trials if t.best_val_iou is not None]
    if not scored:
        return None
    top = scored[0]  # trials are sorted best first
    checkpoint = top.checkpoint
    if isinstance(best_json, dict):
        named = next((t for t in scored if t.trial_id == best_json.get("trial_id")), None)
        if (
            named is not None
            and named.best_val_iou >= top.best_val_iou
            and math.isclose(named.best_val_iou, best_json.get("val_iou") or -1.0, abs_tol=1e-9)
        ):
            top = named
            found = relocate(best_json.get("checkpoint"), experiment)
            checkpoint = str(found) if found else named.checkpoint
    return {
        "trial_id": top.trial_id,
        "val_iou": top.best_val_iou,
        "epoch": top.best_epoch,
        "params": top.params,
        "checkpoint": _relative(checkpoint, experiment),
        "checkpoint_path": checkpoint,
    }


def _relative(path: str | None, experiment: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(experiment))
    except ValueError:
        return path


# ---------------------------------------------------------------------------------------------
# A train run: one trial
# ---------------------------------------------------------------------------------------------


def read_run(run: Path, now: float) -> Snapshot:
    """A `unet-ray train` run folder as a snapshot of one trial named after the run."""
    warnings: list[str] = []
    history_file, best_file = run / HISTORY_FILE, run / BEST_FILE
    rows = _by_epoch(read_jsonl(history_file, warnings))
    best_json = _read_json(best_file, warnings) if best_file.is_file() else None
    trial = Trial(run.name, files=[name for name in (HISTORY_FILE, BEST_FILE) if (run / name).is_file()])
    best_row = _apply_history(trial, rows, run)
    settings = {k.removesuffix(" per trial"): v for k, v in _sweep_settings([trial]).items()}
    updated = max((f.stat().st_mtime for f in (history_file, best_file) if f.is_file()), default=None)
    # best.json is written when the run ends; a resumed run appends to the history after it.
    ended = best_json is not None and best_file.stat().st_mtime >= history_file.stat().st_mtime
    live = not ended and updated is not None and now - updated < LIVE_SECONDS
    trial.status = FINISHED if ended else RUNNING if live else INTERRUPTED
    prepared = run / "prepared"
    run_path = (best_json or {}).get("run_path") if isinstance(best_json, dict) else None
    if not prepared.is_dir() and run_path and storage.is_uri(run_path):  # a run on object storage
        prepared = storage.join(run_path, "prepared")
    elif not prepared.is_dir():  # trained on a prepared folder given with --data
        data = (_run_config(trial) or {}).get("data", {}).get("path")
        prepared = data if data and (storage.is_uri(data) or Path(data).exists()) else None
    return Snapshot(
        name=run.name,
        path=str(run),
        sweep_status="running" if live else "finished" if ended else "stopped",
        updated=updated,
        # a time-budget run's history carries the epochs it planned after its first; else the config's
        max_epochs=(rows[-1].get("epochs_planned") if rows else None) or settings.get("epochs"),
        settings=settings,
        param_keys=[],
        trials=[trial],
        best=_pick_best([trial], None, run),
        prepared=str(prepared) if prepared else None,
        warnings=warnings,
        kind="run",
        per_class=_per_class(best_row, rows[-1] if rows else None, settings.get("classes"),
                            (_run_config(trial) or {}).get("data", {}).get("class_names")),
    )


def _per_class(best: dict[str, Any] | None, last: dict[str, Any] | None, label_set: str | None,
               class_names: list[str] | None = None) -> dict[str, Any] | None:
    """{names, epochs: [{epoch, label, iou: [per class, None where the class is absent]}]}."""
    from unet_ray import palette

    if best is None or not isinstance(best.get("val_iou_per_class"), list):
        return None
    count = len(best["val_iou_per_class"])
    names = palette.class_names(label_set) if label_set in palette.LABEL_SETS else list(class_names or [])
    if len(names) != count:
        names = [f"class {i}" for i in range(count)]
    epochs = [{"epoch": int(best["epoch"]), "label": f"best epoch ({int(best['epoch'])})", "iou": best["val_iou_per_class"]}]
    if last is not None and last is not best and isinstance(last.get("val_iou_per_class"), list):
        epochs.append({"epoch": int(last["epoch"]), "label": f"last epoch ({int(last['epoch'])})", "iou": last["val_iou_per_class"]})
    return {"names": names, "epochs": epochs}
