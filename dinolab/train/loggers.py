"""Where a run's scalars go (``train.loggers``): JSON lines, TensorBoard, Weights & Biases, MLflow.

Every backend has the same small interface (:class:`Logger`): ``log_scalars(record, step)``,
``log_config(config)``, ``log_summary(summary)``, ``log_artifact(path)`` and ``close()``.
:class:`~dinolab.train.run_dir.RunLog` fans each record out to the configured backends; ``metrics.jsonl``
(always on) stays the source of truth that resume, the plots and the health flags read.

* ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "dinolab", name=<run folder name>, dir=RUN,
  config=<resolved config>, resume="allow", id=<RUN/wandb_run_id>)``: a resumed run continues the same
  W&B run. Offline: set ``WANDB_MODE=offline`` yourself (dinolab never sets it); ``wandb sync RUN/wandb/...``
  uploads later.
* ``mlflow``: ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite store ``RUN/mlflow.db`` with artifacts in
  ``RUN/mlartifacts`` (MLflow 3 refuses plain ``file://`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``;
  with that variable set, ``MLFLOW_TRACKING_URI=file:///...`` works too). Experiment ``dinolab``, one MLflow
  run per run folder (its id kept in ``RUN/mlflow_run.json``), the flattened config as params (values cut at
  MLflow's 500 characters) and in full as the artifact ``config.yaml``, each scalar as a metric at
  ``step=iteration``, the plot and ``summary.json`` as artifacts, the summary's scalars as ``summary.*`` tags. Uses :class:`mlflow.tracking.MlflowClient`, not the fluent API, so no
  process-wide active run is left behind.

wandb and mlflow are imported only when configured (they take seconds to import); a missing one is a
one-line ``ValueError`` naming the extra (:func:`check_available`), raised before the run folder is made.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
_EXTRA_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> the package its extra installs
WANDB_ID_FILE = "wandb_run_id"
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_PARAM_MAX = 500  # MLflow's limit on a param value's length


def check_names(loggers: Iterable[str]) -> None:
    """Config-time check of ``train.loggers`` (no imports): known names, no repeats, jsonl kept."""
    names = list(loggers)
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"train.loggers: unknown logger {unknown[0]!r} (choose from {', '.join(LOGGERS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"train.loggers lists a logger twice: {names}")
    if "jsonl" not in names:
        raise ValueError("train.loggers must include jsonl: resume, the plots and the health flags read metrics.jsonl")


def check_available(loggers: Iterable[str]) -> None:
    """The packages the configured loggers need are installed (found, not imported)."""
    for name in loggers:
        package = _EXTRA_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"train.loggers includes {name} but the {package} package is not installed: "
                             f"pip install 'dinolab[{name}]'")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, ``iteration`` left out."""
    return {k: float(v) for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float))}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}`` (lists stay values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Logger:
    """One backend. Every method but ``log_scalars`` is optional."""

    def log_scalars(self, record: dict, step: int) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    """``metrics.jsonl``: one JSON object per record, appended (read back by :meth:`RunLog.records`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log_scalars(self, record: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoardLogger(Logger):
    """TensorBoard events in ``RUN/tb``; ``purge_step`` drops the events a killed run wrote past its checkpoint."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log_scalars(self, record: dict, step: int) -> None:
        for k, v in scalars(record).items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.tb.close()


class WandbLogger(Logger):
    """A Weights & Biases run per run folder; its id in ``RUN/wandb_run_id`` continues it on resume."""

    def __init__(self, run_dir: Path, config: dict, resuming: bool) -> None:
        import wandb

        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dinolab"), name=run_dir.resolve().name,
                              dir=str(run_dir), config=config, id=run_id, resume="allow", reinit="create_new")

    def log_scalars(self, record: dict, step: int) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in flatten(summary).items()
                                 if isinstance(v, (int, float, str, bool)) or v is None})

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            self.run.log({path.stem: self._wandb.Image(str(path))})
        else:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(Logger):
    """One MLflow run per run folder in experiment ``dinolab``; its id in ``RUN/mlflow_run.json``."""

    def __init__(self, run_dir: Path, resuming: bool) -> None:
        from mlflow.tracking import MlflowClient

        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.tracking_uri = env_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(self.tracking_uri)
        id_file = run_dir / MLFLOW_RUN_FILE
        saved = json.loads(id_file.read_text()) if resuming and id_file.exists() else {}
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == self.tracking_uri else None
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # the store lost the run (deleted, another database): start a new one
                self.run_id = None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name("dinolab")
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # the local store keeps its artifacts in the run folder too (not in the current directory)
                location = None if env_uri else (run_dir / "mlartifacts").resolve().as_uri()
                experiment_id = self.client.create_experiment("dinolab", artifact_location=location)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
            id_file.write_text(json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id}) + "\n")
        self.status = "FINISHED"

    def log_scalars(self, record: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_config(self, config: dict) -> None:
        """The flattened config as params; on resume only the keys the run lacks (MLflow params are immutable)."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in flatten(config).items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")  # in full (params are cut at 500 characters)

    def log_summary(self, summary: dict) -> None:
        """Scalar summary values as tags ``summary.*`` (the whole summary is the ``summary.json`` artifact)."""
        self.status = "KILLED" if summary.get("interrupted") else "FINISHED"  # a signal stopped it: resumable
        for k, v in flatten(summary).items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                self.client.set_tag(self.run_id, f"summary.{k}", str(v)[:MLFLOW_PARAM_MAX])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status=self.status)


def open_loggers(names: Iterable[str], run_dir: Path, config: dict, purge_step: int | None = None) -> list[Logger]:
    """The configured backends, jsonl first; ``purge_step`` not None means a resumed run."""
    resuming = purge_step is not None
    out: list[Logger] = []
    for name in names:
        if name == "jsonl":
            out.insert(0, JsonlLogger(run_dir / "metrics.jsonl"))
        elif name == "tensorboard":
            try:
                out.append(TensorBoardLogger(run_dir / "tb", purge_step))
            except ImportError:  # tensorboard is optional at run time
                pass
        elif name == "wandb":
            out.append(WandbLogger(run_dir, config, resuming))
        elif name == "mlflow":
            out.append(MlflowLogger(run_dir, resuming))
        else:
            raise ValueError(f"train.loggers: unknown logger {name!r}")
    for logger in out:
        logger.log_config(config)
    return out
