"""The default alerts file lands in the directory of this run of the first logger: TensorBoard and CSV
version directories, the MLflow run's artifacts (file store), the W&B run's files (offline)."""
from __future__ import annotations

import warnings

import pytest
from boundguard.integrations.lightning import BoundGuard
from conftest import L, Tiny, data, loader


def _fit(logger, tmp_path):
    x, y = data(n=128, kind="unit")
    g = BoundGuard(bounds=(0, 1), on_violation="log")
    t = L.Trainer(max_steps=2, callbacks=[g], logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Tiny(scale=8.0), loader(x, y))
    assert g.alerts_path is not None and g.alerts_path.exists(), g.alerts_path
    return g.alerts_path


@pytest.mark.parametrize("make", [
    lambda p: L.loggers.TensorBoardLogger(p, name="tb"),
    lambda p: L.loggers.CSVLogger(p, name="csv"),
], ids=["tensorboard", "csv"])
def test_version_directory_loggers(tmp_path, make):
    first = _fit(make(tmp_path), tmp_path)
    second = _fit(make(tmp_path), tmp_path)
    assert first.parent.name == "version_0" and second.parent.name == "version_1"


def test_mlflow_file_store_run_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind a flag
    store = tmp_path / "mlruns"
    paths = [_fit(L.loggers.MLFlowLogger(experiment_name="e", tracking_uri=f"file:{store}"), tmp_path)
             for _ in range(2)]
    assert paths[0] != paths[1], "each run gets its own file"
    for p in paths:
        assert p.parent.name == "artifacts" and store in p.parents


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = L.loggers.WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    path = _fit(logger, tmp_path)
    logger.experiment.finish()
    assert path.parent.name == "files" and tmp_path in path.parents and path.parent != tmp_path / "wandb"
