"""train.loggers: W&B (offline) and MLflow (local stores) record the scalars of metrics.jsonl, the config,
the plot and the summary; a resumed run continues the same runs; a missing package is one line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dinolab.cli import main
from dinolab.configs import load_config
from dinolab.train.loggers import MLFLOW_RUN_FILE, WANDB_ID_FILE, MlflowLogger
from dinolab.train.loop import train
from tiny_run import TINY_RUN

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TINY = [*TINY_RUN, "optim.epochs=1"]  # 3 iterations
ALL = "train.loggers=[jsonl,tensorboard,wandb,mlflow]"


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=rng.integers(0, 255, (16, 20, 20, 3), dtype=np.uint8), y_train=np.arange(16) % 2)
    return str(path)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """W&B offline and silent, MLflow on no server: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under ~
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tiny_cfg(data, *extra):
    return load_config("cpu", [*TINY, *extra], base={"data": {"path": data}})


def jsonl_series(run_dir, key):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r[key]) for r in records if key in r]


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())
    return MlflowClient(saved["tracking_uri"]), saved["run_id"]


def wandb_records(path):
    """The records of a W&B offline ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    chunks (crc32, little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) in 32 KiB blocks, each record a
    ``wandb_internal_pb2.Record``. (wandb 0.31 ships no Python reader: its core that writes it is in Go.)"""
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", "not a W&B offline data file"
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if kind == 0:
            break
        parts.append(raw[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_offline_run(run_dir):
    """(run record, history rows as {key: value}, the offline run folder) of the run folder's W&B run."""
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert folders, f"no offline W&B run {run_id} in {run_dir / 'wandb'}"
    run, rows = None, []
    for folder in folders:  # a resumed run writes a second folder with the same id
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return run, rows, folders


def wandb_series(rows, key):
    return [(row["_step"], row[key]) for row in rows if key in row]


def test_all_four_loggers_record_the_same_scalars(data, tmp_path, monkeypatch):
    # MLflow in a file store in tmp (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE for one); W&B offline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    summary = train(tiny_cfg(data, ALL), run_dir, progress=False)
    assert summary["iterations"] == 3
    expected = jsonl_series(run_dir, "total")
    assert [step for step, _ in expected] == [1, 2, 3]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    client, run_id = mlflow_run(run_dir)
    assert client.tracking_uri == (tmp_path / "mlruns").as_uri()
    for key in ("total", "dino", "lr", "images_per_second"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == jsonl_series(run_dir, key)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "dinolab"
    assert run.data.params["train.loggers"] == str(["jsonl", "tensorboard", "wandb", "mlflow"])
    assert run.data.params["student.embed_dim"] == "32"
    assert run.data.tags["summary.iterations"] == "3"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"loss_curves.png", "summary.json", "config.yaml"}

    run, rows, (folder,) = wandb_offline_run(run_dir)
    assert run.project == "dinolab" and run.display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["loggers"] == ["jsonl", "tensorboard", "wandb", "mlflow"]
    for key in ("total", "dino", "lr", "images_per_second"):
        assert wandb_series(rows, key) == jsonl_series(run_dir, key)
    assert any(row.get("loss_curves/_type") == "image-file" for row in rows)  # nested keys joined by "/"
    assert list((folder / "files" / "media" / "images").glob("loss_curves_*.png"))
    assert (folder / "files" / "summary.json").exists()


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(data, tmp_path):
    # MLflow's local default: RUN/mlflow.db with its artifacts in RUN/mlartifacts
    run_dir = tmp_path / "run"
    train(tiny_cfg(data, "train.loggers=[jsonl,wandb,mlflow]", "train.max_iters=2"), run_dir, progress=False)
    client, first_mlflow = mlflow_run(run_dir)
    assert client.tracking_uri == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    first_wandb = (run_dir / WANDB_ID_FILE).read_text()
    # the loggers may change on resume (train.loggers is resume-free)
    assert train(tiny_cfg(data, ALL), run_dir, progress=False)["iterations"] == 3
    client, second_mlflow = mlflow_run(run_dir)
    assert second_mlflow == first_mlflow and (run_dir / WANDB_ID_FILE).read_text() == first_wandb
    history = client.get_metric_history(second_mlflow, "total")
    assert [(m.step, m.value) for m in history] == jsonl_series(run_dir, "total")
    assert [m.step for m in history] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(second_mlflow)} >= {"loss_curves.png", "summary.json"}
    assert (run_dir / "mlartifacts").is_dir()
    _, rows, folders = wandb_offline_run(run_dir)
    assert len(folders) == 2  # one offline folder per session, both of the same W&B run id
    assert wandb_series(rows, "total") == jsonl_series(run_dir, "total")

    # a fresh start in the same folder (--no-resume) is a new run in both
    train(tiny_cfg(data, ALL, "train.max_iters=1"), run_dir, resume=False, progress=False)
    _, fresh_mlflow = mlflow_run(run_dir)
    assert fresh_mlflow != first_mlflow and (run_dir / WANDB_ID_FILE).read_text() != first_wandb


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_logger_package_is_one_line_before_any_work(data, tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` fails and find_spec finds nothing
    run_dir = tmp_path / "run"
    message = f"train.loggers includes {name} but the {name} package is not installed: pip install 'dinolab[{name}]'"
    with pytest.raises(ValueError) as err:
        train(tiny_cfg(data, f"train.loggers=[jsonl,{name}]"), run_dir, progress=False)
    assert str(err.value) == message
    assert not run_dir.exists()
    code = main(["train", "--preset", "cpu", "--data", data, "--output", str(run_dir), *TINY,
                 f"train.loggers=[jsonl,{name}]"])
    assert code == 2 and capsys.readouterr().err.strip() == f"dinolab train: error: {message}"
    assert not run_dir.exists()


@pytest.mark.parametrize("value, error", [
    ("[tensorboard]", "train.loggers must include jsonl: resume, the plots and the health flags read metrics.jsonl"),
    ("[jsonl,neptune]", "train.loggers: unknown logger 'neptune' (choose from jsonl, tensorboard, wandb, mlflow)"),
    ("[jsonl,wandb,wandb]", "train.loggers lists a logger twice: ['jsonl', 'wandb', 'wandb']"),
])
def test_logger_names_are_checked_with_the_config(value, error):
    with pytest.raises(ValueError) as err:
        load_config("cpu", [f"train.loggers={value}"])
    assert str(err.value) == error
    assert load_config("cpu").train.loggers == ["jsonl", "tensorboard"]


def test_mlflow_params_are_cut_at_500_characters(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MlflowLogger(tmp_path, resuming=False)
    logger.log_config({"data": {"path": "x" * 600, "n": None}, "train": {"loggers": ["jsonl", "mlflow"]}})
    logger.close()
    params = logger.client.get_run(logger.run_id).data.params
    assert params == {"data.path": "x" * 500, "data.n": "None", "train.loggers": "['jsonl', 'mlflow']"}
