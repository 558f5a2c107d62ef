"""Experiment tracking: each train run and each sweep, where a team already looks.

- TensorBoard: every Ray Train run (`unet-ray train`, every trial of a sweep) writes event files
  into <run folder>/tensorboard: each epoch's scalars; `unet-ray train` adds a few predicted
  masks at the end (summary.finish_train). Always on; written with tensorboardX, which Ray Tune
  installs. `--tracking tensorboard` adds the config to TensorBoard's HParams tab.
- MLflow (`--tracking mlflow`): a train run is one MLflow run: the whole config as parameters,
  each epoch's metrics, the report page and the best checkpoint (folder `model`) as artifacts,
  tags for the code and Ray versions. A sweep is one parent run (base config, search space, best
  trial, best model, report page) with a child run per trial (tag mlflow.parentRunId).
- Weights & Biases (`--tracking wandb`): the same as W&B runs; a sweep's runs share a group.

Where to send is set the tools' own way: MLFLOW_TRACKING_URI (default: MLflow's own,
sqlite:///mlflow.db here), MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID (default experiment
"unet_ray"), WANDB_PROJECT (default "unet_ray"), WANDB_ENTITY, WANDB_MODE, WANDB_DIR, and their
credentials. Nothing from the environment is logged; config values that could hold a secret
(user:password@ in a URI, a token in a query string) are logged with it masked.

Where the logging happens, and why there: in the driver (the `unet-ray train` or `unet-ray tune`
process), from the history.jsonl rows that the Train controller's callback (train.history_callback)
appends each epoch. A train run's driver follows the file with a thread while `trainer.fit()`
blocks; a sweep's driver reads a trial's new rows when Tune hands it the trial's result (a Tune
callback, tune.tracking_callback; the controller writes the row before it reports to Tune).
- The numbers are history.jsonl's rows, read back: the same names and values by construction.
- One process owns every tracked run from start to end. A W&B run cannot be written by two
  processes; the artifacts (report page, best model) only exist in the driver after training; a
  trial's own process is ended without notice when the scheduler stops it; and the credentials
  stay in the driver's environment (on a joined cluster, Ray's processes do not inherit it).
- A tracking server that fails costs the driver a warning, never a training worker or the
  controller (an exception in a Train callback fails the run).
- Ray's own integrations do not cover this: setup_mlflow / setup_wandb open the run inside the
  training function (rank 0), where the report page and the best checkpoint do not exist, and
  MLflowLoggerCallback / WandbLoggerCallback are Tune callbacks over Tune's results, with no
  MLflow parent run for a sweep and nothing for a plain Train V2 run.

A tracking server that cannot be reached when a run starts is a ConfigError before Ray starts;
one that fails later costs one warning, and that tool is dropped for the rest of the run (its
client's retries would otherwise stall the end of the run). Nothing happens at import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from unet_ray import jsonfile
from unet_ray.runfiles import HISTORY_FILE, RUNS_DIR
from unet_ray.config import ConfigError

STATE_FILE = "tracking.json"  # in the run folder: the tracked runs, so that a resumed run continues them
TENSORBOARD_DIR = "tensorboard"
DEFAULT_NAME = "unet_ray"  # MLflow experiment and W&B project when the environment names none
PROBE_TIMEOUT_S = 5.0
FOLLOW_EVERY_S = 2.0
CLOSE_TIMEOUT_S = 60.0
# Defaults only: the user's own settings win. MLflow's HTTP client retries 7 times with exponential
# backoff (minutes) by default; a run must not stall that long on a server that went away. Its
# "View run at <server URI>" lines: ours say it (Tracked.lines), with any password in the URI masked.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
INSTALL_HINT = 'pip install -e ".[tracking]"'

SECRET_KEY = re.compile(r"token|secret|passw|api[_-]?key|access[_-]?key|credential", re.I)
# user:password@ of a URI, up to its first @ (a secret key may hold a "/", as AWS's do)
URI_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^@\s]+?@", re.I)
QUERY_SECRET = re.compile(r"([?&][^=&#\s]*(?:token|secret|passw|signature|key|credential)[^=&#\s]*=)[^&#\s]*", re.I)


# ---------------------------------------------------------------------------------------------
# What is logged: parameters without secrets, tags, each epoch's metrics
# ---------------------------------------------------------------------------------------------


def redact(text: str) -> str:
    """`text` with the user:password@ of URIs and secret-looking query values masked."""
    return QUERY_SECRET.sub(r"\1***", URI_USERINFO.sub(r"\1***@", text))


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"section.key": value as text} of a nested config, secrets masked."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = redact(",".join(str(v) for v in value))
        elif SECRET_KEY.search(key) and value not in (None, ""):
            flat[name] = "***"
        else:
            flat[name] = redact(str(value))
    return flat


def safe_config(config: dict[str, Any]) -> dict[str, Any]:
    """A nested config (W&B's run config) with the same masking as flat_params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out[key] = safe_config(value)
        elif SECRET_KEY.search(key) and value not in (None, ""):
            out[key] = "***"
        elif isinstance(value, str):
            out[key] = redact(value)
        elif isinstance(value, (list, tuple)):
            out[key] = [redact(v) if isinstance(v, str) else v for v in value]
        else:
            out[key] = value
    return out


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout this package is installed from (editable), else None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0 or not commit.stdout.strip():
        return None
    return commit.stdout.strip(), bool(status.stdout.strip())


def version_tags() -> dict[str, str]:
    """The code version (git commit of the checkout, else the package version) and Ray's."""
    from unet_ray import __version__

    tags = {
        "unet_ray.version": __version__,
        "unet_ray.code_version": __version__,
        "ray.version": _package_version("ray") or "unknown",
        "torch.version": _package_version("torch") or "unknown",
    }
    git = git_commit()
    if git:
        commit, dirty = git
        tags.update({"unet_ray.code_version": commit + ("-dirty" if dirty else ""), "unet_ray.git_commit": commit,
                     "unet_ray.git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit})  # fmt: skip
    return tags


def epoch_metrics(row: dict[str, Any], class_names: list[str] | None = None) -> dict[str, float]:
    """The numbers of one history.jsonl row under its own names; a per-class list as
    name/<class> (classes absent from the split, None, are left out). Text and flags are not
    metrics; `checkpoint` and `time` are the row's bookkeeping."""
    metrics: dict[str, float] = {}
    for key, value in row.items():
        if key in ("checkpoint", "time") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            metrics[key] = float(value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    label = class_names[i] if class_names and i < len(class_names) else str(i)
                    metrics[f"{key}/{label}"] = float(item)
    return metrics


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return redact(f"{type(error).__name__}: {first}"[:300])


def _verbose() -> bool:
    """console.is_verbose, read here: console's Ray helpers would put Ray in this module's imports
    (the layer contract keeps tracking free of Ray)."""
    return os.environ.get("UNET_RAY_VERBOSE") == "1"


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Before Ray starts: the tools are installed and their servers answer
# ---------------------------------------------------------------------------------------------


def check_installed(tools: list[str]) -> None:
    needs = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboardX"}
    for tool in tools:
        if importlib.util.find_spec(needs[tool]) is None:
            raise ConfigError(f"tracking: {tool} needs the {needs[tool]} package: {INSTALL_HINT}")


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when something answers HTTP at `url` (any status: it may want a login), else why not."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:  # reachability only: no credentials sent
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        reason = e.reason
        return redact(str(getattr(reason, "strerror", None) or reason))
    except (OSError, ValueError) as e:  # timeouts, resets, a malformed URI
        return redact(str(e) or type(e).__name__)


def mlflow_uri() -> str:
    """The tracking URI MLflow itself would use here; a local store's path made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):  # without importing mlflow (2 s): the probe comes first
        return uri
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri and ":" not in uri.split("/")[0]:  # a plain path: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def check_mlflow_server(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        why = probe(uri.rstrip("/") + "/health")
        if why is not None:
            raise ConfigError(f"tracking: MLflow server at {redact(uri)} cannot be reached ({why})")
    elif uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")) and importlib.util.find_spec("alembic") is None:
        raise ConfigError(f"tracking: MLflow's store {redact(uri)} needs sqlalchemy and alembic: {INSTALL_HINT}")


def wandb_settings() -> dict[str, Any]:
    """Where W&B runs go, from W&B's own variables, resolved here (trials run in other folders)."""
    return {
        "project": os.environ.get("WANDB_PROJECT") or DEFAULT_NAME,
        "entity": os.environ.get("WANDB_ENTITY") or None,
        "dir": str(Path(os.environ.get("WANDB_DIR") or os.getcwd()).resolve()),
        "mode": os.environ.get("WANDB_MODE", "online").lower(),
    }


def check_wandb_server(settings: dict[str, Any]) -> None:
    if settings["mode"] in ("offline", "disabled", "dryrun"):
        return
    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    why = probe(base)
    if why is not None:
        raise ConfigError(
            f"tracking: W&B server at {redact(base)} cannot be reached ({why}); WANDB_MODE=offline logs "
            "to local files (`wandb sync` sends them later)"
        )


# ---------------------------------------------------------------------------------------------
# The tools
# ---------------------------------------------------------------------------------------------


class _Sink:
    label = ""
    key = ""

    def __init__(self) -> None:
        self.broken = False
        self.logged_epoch = 0

    def log_epoch(self, epoch: int, metrics: dict[str, float], when: float | None) -> None: ...
    def log_file(self, path: Path, artifact_path: str | None) -> None: ...
    def log_dir(self, path: Path, artifact_path: str) -> None: ...
    def log_images(self, images: list[tuple[str, Any]], step: int) -> None: ...
    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None: ...
    def close(self, status: str) -> None: ...
    def state(self) -> dict[str, Any]:
        return {"epoch": self.logged_epoch}

    def where(self) -> str | None:
        return None


class _MLflow(_Sink):
    label, key = "MLflow", "mlflow"

    def __init__(self, uri: str, experiment_id: str, run_id: str, logged_epoch: int = 0) -> None:
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment_id, self.run_id = uri, experiment_id, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.logged_epoch = logged_epoch

    @classmethod
    def open(cls, uri: str, name: str, params: dict[str, str], tags: dict[str, str], experiment_id: str | None,
             parent_run_id: str | None, previous: dict[str, Any] | None) -> "_MLflow":  # fmt: skip
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if not _verbose():
            # urllib3 logs each retry of a server that went away (to stderr, through Python's last-
            # resort handler); our one warning says it (Tracked._call)
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        client = MlflowClient(tracking_uri=uri)
        if previous and previous.get("uri") == redact(uri) and previous.get("run_id"):  # a resumed run goes on
            try:
                run = client.get_run(previous["run_id"])
                if run.info.lifecycle_stage == "active":
                    client.update_run(run.info.run_id, status="RUNNING")
                    return cls(uri, run.info.experiment_id, run.info.run_id, int(previous.get("epoch", 0)))
            except Exception:  # deleted meanwhile, or another server: a new run
                pass
        if experiment_id is None:
            experiment_id = cls._experiment(client)
        run_tags = {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        run = client.create_run(experiment_id, run_name=name, tags=run_tags)
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit per request
            client.log_batch(run.info.run_id, params=items[start : start + 100])
        return cls(uri, experiment_id, run.info.run_id)

    @staticmethod
    def _experiment(client) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_NAME
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # created at the same moment by another run
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_epoch(self, epoch, metrics, when):
        from mlflow.entities import Metric

        stamp = int((when or time.time()) * 1000)
        items = [Metric(k, v, stamp, epoch) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_file(self, path, artifact_path):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dir(self, path, artifact_path):
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_summary(self, metrics, tags):
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])  # fmt: skip

    def close(self, status):
        self.client.set_terminated(self.run_id, status)

    def state(self):
        return {"uri": redact(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id, "epoch": self.logged_epoch}

    def where(self):
        if self.uri.startswith(("http://", "https://")):
            return f"{redact(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {redact(self.uri)}"


class _Wandb(_Sink):
    label, key = "W&B", "wandb"

    def __init__(self, run, settings: dict[str, Any], logged_epoch: int = 0) -> None:
        super().__init__()
        self.run, self.settings, self.logged_epoch = run, settings, logged_epoch

    @classmethod
    def open(cls, settings: dict[str, Any], name: str, config: dict[str, Any], tags: dict[str, str], group: str | None,
             job_type: str, previous: dict[str, Any] | None) -> "_Wandb":  # fmt: skip
        if not _verbose():  # W&B's own lines (artifact uploads, ...) off, unless the user set it
            os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        resume_id = (previous or {}).get("id")
        Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=settings["project"], entity=settings["entity"], dir=settings["dir"],  # WANDB_MODE: W&B reads it
            name=name, group=group, job_type=job_type, config={**config, "versions": tags},
            tags=[f"code:{tags['unet_ray.code_version'][:12]}", f"ray:{tags['ray.version']}", job_type],
            id=resume_id, resume="allow" if resume_id else None, reinit="create_new",
            # no console capture (the console is ours), no system metrics thread, no command line
            # (a --storage-path can carry credentials), no git remote (it can carry a token; the
            # commit is in the config's versions)
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True, save_code=False,
                                    disable_git=True),
        )  # fmt: skip
        return cls(run, settings, int((previous or {}).get("epoch", 0)) if resume_id else 0)

    def log_epoch(self, epoch, metrics, when):
        self.run.log(metrics, step=epoch)

    def _artifact(self, kind: str):
        import wandb

        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.run.name or self.run.id}-{kind}")
        return wandb.Artifact(name, type=kind)

    def log_file(self, path, artifact_path):
        artifact = self._artifact(artifact_path or path.stem)  # <run name>-report, <run name>-best
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_dir(self, path, artifact_path):
        artifact = self._artifact(artifact_path)
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact)

    def log_summary(self, metrics, tags):
        self.run.summary.update({**metrics, **tags})

    def close(self, status):
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def state(self):
        return {"id": self.run.id, "project": self.run.project, "epoch": self.logged_epoch}

    def where(self):
        if getattr(self.run, "offline", False):
            return f"run {self.run.id} offline in {Path(self.run.dir).parent} (`wandb sync` uploads it)"
        return self.run.url or f"run {self.run.id}"


class _TensorBoard(_Sink):
    label, key = "TensorBoard", "tensorboard"

    def __init__(self, logdir: Path, hparams: dict[str, Any] | None, logged_epoch: int = 0) -> None:
        super().__init__()
        self.logdir, self.hparams, self.logged_epoch = logdir, hparams, logged_epoch
        self._writer = None
        self.last: dict[str, float] = {}  # the last epoch's metrics (the HParams tab's value)

    @property
    def writer(self):  # opened at the first event: a run that stops before training leaves no file
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=10)
        return self._writer

    def log_epoch(self, epoch, metrics, when):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=epoch, walltime=when)
        self.writer.flush()
        self.last = metrics

    def log_images(self, images, step):
        for tag, image in images:
            self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self, status):
        if self.hparams is not None and "best_val_iou" in self.last:
            from tensorboardX.summary import hparams

            # the HParams tab reads the metric's values from the run's own best_val_iou scalars
            for summary in hparams(self.hparams, {"best_val_iou": self.last["best_val_iou"]}):
                self.writer.file_writer.add_summary(summary)
        if self._writer is not None:
            self._writer.close()

    def where(self):
        return f"tensorboard --logdir {self.logdir}"


# ---------------------------------------------------------------------------------------------
# A tracked run: the sinks of one train run, sweep or trial
# ---------------------------------------------------------------------------------------------


class Tracked:
    """The tracked runs of one train run, sweep or trial, in every tool it goes to. A context
    manager: leaving it ends the runs (FINISHED; FAILED on an error; KILLED on Ctrl-C)."""

    def __init__(self, kind: str, folder: Path, sinks: list[_Sink], class_names: list[str] | None = None) -> None:
        self.kind, self.folder, self.sinks, self.class_names = kind, folder, sinks, class_names
        self._lock = threading.Lock()
        self._closed = False

    @property
    def remote(self) -> bool:
        """Whether a tool other than the run folder's own TensorBoard files takes artifacts."""
        return any(s.key in ("mlflow", "wandb") and not s.broken for s in self.sinks)

    def lines(self) -> list[str]:
        return [f"tracking: {s.label}: {s.where()}" for s in self.sinks if s.key != "tensorboard" and s.where()]

    def _call(self, sink: _Sink, what: str, fn, *args) -> bool:
        if sink.broken:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:  # a tracking failure never fails the training
            sink.broken = True
            _warn(f"tracking: warning: {sink.label} stopped working ({what}: {_short(e)}); the run goes on without it")
            return False

    def _save_state(self) -> None:
        state = {s.key: s.state() for s in self.sinks}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            jsonfile.write_atomic(self.folder / STATE_FILE, state)
        except OSError:
            pass

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One history.jsonl row, in every tool that has not seen its epoch yet."""
        if not isinstance(row.get("epoch"), (int, float)):
            return
        epoch = int(row["epoch"])
        metrics = epoch_metrics(row, self.class_names)
        with self._lock:
            changed = False
            for sink in self.sinks:
                if epoch > sink.logged_epoch and self._call(sink, f"epoch {epoch}", sink.log_epoch, epoch, metrics, row.get("time")):
                    sink.logged_epoch = epoch
                    changed = True
            if changed:
                self._save_state()

    def log_history(self, history_file: Path) -> None:
        for row in _read_rows(history_file, 0)[0]:
            self.log_epoch(row)

    @contextmanager
    def follow(self, history_file: Path) -> Iterator[None]:
        """Log history.jsonl's rows while the block runs (a thread; every row by the end)."""
        follower = _Follower(history_file, self.log_epoch)
        follower.start()
        try:
            yield
        finally:
            follower.close()

    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        with self._lock:
            for sink in self.sinks:
                if sink.key != "tensorboard":
                    self._call(sink, f"upload {Path(path).name}", sink.log_file, Path(path), artifact_path)

    def log_model(self, checkpoint: str | os.PathLike) -> None:
        """The checkpoint folder (state.pt: what evaluate, predict and export take) as `model`."""
        folder = Path(checkpoint)
        if not folder.is_dir():
            return
        with self._lock:
            for sink in self.sinks:
                if sink.key != "tensorboard":
                    self._call(sink, "upload the model", sink.log_dir, folder, "model")

    def log_images(self, images: list[tuple[str, Any]], step: int) -> None:
        with self._lock:
            for sink in self.sinks:
                self._call(sink, "images", sink.log_images, images, step)

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        with self._lock:
            for sink in self.sinks:
                self._call(sink, "summary", sink.log_summary, metrics, tags)

    def close(self, status: str = "FINISHED") -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for sink in self.sinks:
                self._call(sink, "end the run", sink.close, status)
            self._save_state()

    def __enter__(self) -> "Tracked":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _read_rows(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete rows of a JSON-lines file from byte `offset`, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    rows = []
    for line in data[: end + 1].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows, offset + end + 1


class _Follower:
    """A thread that hands each new complete row of a JSON-lines file to `on_row`."""

    def __init__(self, path: Path, on_row) -> None:
        self.path, self.on_row, self.offset = Path(path), on_row, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="unet-ray-tracking", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def poll(self) -> None:
        rows, self.offset = _read_rows(self.path, self.offset)
        for row in rows:
            self.on_row(row)

    def _loop(self) -> None:
        while not self.stop.wait(FOLLOW_EVERY_S):
            try:
                self.poll()
            except Exception as e:  # never let the thread die silently
                _warn(f"tracking: warning: reading {self.path} failed ({_short(e)})")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(CLOSE_TIMEOUT_S)
        if self.thread.is_alive():  # stuck sending: leave it (a daemon thread), the run is done
            _warn(f"tracking: warning: still sending after {CLOSE_TIMEOUT_S:g}s; the last epochs may be missing")
            return
        self.poll()


# ---------------------------------------------------------------------------------------------
# Starting: a train run, a sweep, a trial
# ---------------------------------------------------------------------------------------------


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _open_sinks(tools: list[str], folder: Path, name: str, params_nested: dict[str, Any], tags: dict[str, str],
                tensorboard: bool, parent: dict[str, Any] | None, job_type: str, strict: bool,
                progress) -> list[_Sink]:  # fmt: skip
    """The sinks of one tracked run. `strict` (a driver, before Ray): a problem is a ConfigError;
    else (a trial) a warning, and the run goes on without that tool."""
    previous = _read_state(folder)
    sinks: list[_Sink] = []
    if tensorboard:
        hparams = flat_params(params_nested) if "tensorboard" in tools else None
        sinks.append(_TensorBoard(folder / TENSORBOARD_DIR, hparams, int((previous.get("tensorboard") or {}).get("epoch", 0))))
    parent = parent or {}
    for tool in tools:
        if tool == "tensorboard":
            continue
        try:
            if tool == "mlflow":
                for key, value in MLFLOW_DEFAULTS.items():
                    os.environ.setdefault(key, value)
                uri = parent.get("mlflow_uri") or mlflow_uri()
                if strict:
                    check_mlflow_server(uri)
                sink: _Sink = _MLflow.open(uri, name, flat_params(params_nested), tags, parent.get("mlflow_experiment_id"),
                                           parent.get("mlflow_run_id"), previous.get("mlflow"))  # fmt: skip
            else:
                settings = parent.get("wandb_settings") or wandb_settings()
                if strict:
                    check_wandb_server(settings)
                sink = _Wandb.open(settings, name, safe_config(params_nested), tags, parent.get("wandb_group"), job_type,
                                   previous.get("wandb"))  # fmt: skip
        except ConfigError:
            raise
        except Exception as e:
            label = {"mlflow": "MLflow", "wandb": "W&B"}[tool]
            where = redact(parent.get("mlflow_uri") or os.environ.get("MLFLOW_TRACKING_URI", "")) if tool == "mlflow" else ""
            message = f"tracking: {label}{' at ' + where if where else ''} could not start the run ({_short(e)})"
            if strict:
                for started in sinks:  # leave nothing half open
                    try:
                        started.close("FAILED")
                    except Exception:
                        pass
                raise ConfigError(message) from None
            _warn(f"{message}; the run goes on without it")
            continue
        sinks.append(sink)
        if strict:
            progress(f"tracking: {sink.label}: {sink.where()}")
    return sinks


def start_run(cfg, run_dir: Path, progress=print) -> Tracked:
    """`unet-ray train`: before Ray starts, the run's tracked runs (an unreachable server: ConfigError)."""
    tools = list(cfg.run.tracking)
    check_installed(tools)
    tags = {**version_tags(), "unet_ray.kind": "train", "unet_ray.run_folder": str(run_dir)}
    sinks = _open_sinks(tools, run_dir, cfg.run.name, cfg.to_dict(), tags, True, None, "train", True, progress)
    return Tracked("train", run_dir, sinks, list(cfg.class_set.names))


def start_sweep(base, search: dict[str, Any], tune_settings: dict[str, Any], experiment: Path, progress=print) -> "Sweep":
    """`unet-ray tune`: before Ray starts, the sweep's parent runs. Its trials' child runs are
    started, fed and ended by the Tune callback of tune.py (tracking_callback), in this process."""
    tools = list(base.run.tracking)
    check_installed(tools)
    tags = {**version_tags(), "unet_ray.kind": "sweep", "unet_ray.run_folder": str(experiment)}
    params = {**base.to_dict(), "search": {k: _search_text(v) for k, v in search.items()}, "tune": tune_settings}
    # W&B: the sweep's run and its trials' runs share a group, the sweep's name
    sinks = _open_sinks(tools, experiment, base.run.name, params, tags, False, {"wandb_group": base.run.name}, "sweep",
                        True, progress)  # fmt: skip
    return Sweep(base.run.name, experiment, sinks, list(base.class_set.names), tools, tags)


def _search_text(spec: dict[str, Any]) -> str:
    kind, values = next(iter(spec.items()))
    return f"{kind} {values}"


class Sweep(Tracked):
    """A sweep's parent runs and, from the same process, a child run per trial in each tool, fed
    from the trial's history.jsonl when Tune hands the driver the trial's result. A trial's own
    process would not do: Tune ends it without notice when the scheduler stops the trial, and
    then its runs could not end themselves (nor log the epoch that decided it)."""

    def __init__(self, name: str, folder: Path, sinks: list[_Sink], class_names: list[str], tools: list[str],
                 tags: dict[str, str]) -> None:  # fmt: skip
        super().__init__("sweep", folder, sinks, class_names)
        self.name, self.tools, self.tags = name, tools, tags
        self.trials: dict[str, Tracked] = {}
        self.offsets: dict[str, int] = {}
        self.trial_config = None  # Tune's params -> the trial's whole config (a dict); set by tune.py
        self.runs_dir = folder / RUNS_DIR  # runs/<trial_id>/ holds each trial's Train run

    def _parent(self) -> dict[str, Any]:
        """What a child run needs of its parents' (those that still work)."""
        parent: dict[str, Any] = {}
        for sink in self.sinks:
            if isinstance(sink, _MLflow) and not sink.broken:
                parent.update(mlflow_uri=sink.uri, mlflow_experiment_id=sink.experiment_id, mlflow_run_id=sink.run_id)
            elif isinstance(sink, _Wandb) and not sink.broken:
                parent.update(wandb_settings=sink.settings, wandb_group=self.name)
        return parent

    def _safely(self, trial_id: str, fn, *args) -> None:
        """Tune calls these from its driver loop: an exception there would end the sweep."""
        try:
            fn(trial_id, *args)
        except Exception as e:
            _warn(f"tracking: warning: trial {trial_id}: {_short(e)}; the sweep goes on")

    def trial_started(self, trial_id: str, params: dict[str, Any]) -> None:
        self._safely(trial_id, self._trial_started, params)

    def trial_result(self, trial_id: str) -> None:
        self._safely(trial_id, self._trial_result)

    def trial_ended(self, trial_id: str, failed: bool, epochs: int) -> None:
        self._safely(trial_id, self._trial_ended, failed, epochs)

    def _trial_started(self, trial_id: str, params: dict[str, Any]) -> None:
        if trial_id in self.trials:
            return
        parent = self._parent()
        remote = {"mlflow": "mlflow_run_id" in parent, "wandb": "wandb_group" in parent}
        tools = [t for t in self.tools if remote.get(t, True)]
        folder = self.runs_dir / trial_id
        folder.mkdir(parents=True, exist_ok=True)
        config = self.trial_config(params) if self.trial_config else dict(params)
        tags = {**self.tags, "unet_ray.kind": "trial", "unet_ray.trial_id": trial_id, "unet_ray.run_folder": str(folder)}
        sinks = _open_sinks(tools, folder, trial_id, config, tags, True, parent, "trial", False, lambda *_: None)
        self.trials[trial_id] = Tracked("trial", folder, sinks, self.class_names)
        self.offsets[trial_id] = 0

    def _trial_result(self, trial_id: str) -> None:
        """The trial's new history.jsonl rows (its controller writes each before Tune gets it)."""
        child = self.trials.get(trial_id)
        if child is None:
            return
        rows, self.offsets[trial_id] = _read_rows(child.folder / HISTORY_FILE, self.offsets[trial_id])
        for row in rows:
            child.log_epoch(row)

    def _trial_ended(self, trial_id: str, failed: bool, epochs: int) -> None:
        """FAILED on an error; FINISHED when it trained all `epochs`; else KILLED (stopped early)."""
        self._trial_result(trial_id)
        child = self.trials.pop(trial_id, None)
        if child is not None:
            done = max((s.logged_epoch for s in child.sinks), default=0) >= epochs
            child.close("FAILED" if failed else "FINISHED" if done else "KILLED")

    def close(self, status: str = "FINISHED") -> None:
        for trial_id in list(self.trials):  # interrupted: the sweep resumes them (their runs go on)
            self.trial_result(trial_id)
            self.trials.pop(trial_id).close("KILLED" if status == "FINISHED" else status)
        super().close(status)


_current_sweep: Sweep | None = None


def set_current_sweep(sweep: Sweep | None) -> None:
    """The sweep whose trials the Tune callback reports (tune.tracking_callback). Looked up at
    each event rather than held: Tune pickles its callbacks, and restores them on --resume."""
    global _current_sweep
    _current_sweep = sweep


def current_sweep() -> Sweep | None:
    return _current_sweep
