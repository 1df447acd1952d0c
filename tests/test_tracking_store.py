"""The embedded tracking store is created whole or not at all: a run stopped at any moment of its
creation leaves no store (the next run makes one), and a store that cannot be used gets one line."""
from __future__ import annotations

import re

import pytest

from lab.config import TrackingConfig
from lab.tracking import Tracker, TrackingError


class Stop(BaseException):
    """Stands for the SIGKILL or Ctrl-C that ends the process at that moment."""


def _stop(*_a, **_k):
    raise Stop


MOMENTS = {  # where the creation is stopped part-way
    "creating the tables": ("mlflow.store.db.utils.InitialBase.metadata.create_all", _stop),
    "migrating them": ("mlflow.store.db.utils._upgrade_db", _stop),
    "moving the store into place": ("lab.tracking.os.replace", _stop),
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_run_stopped_while_the_store_is_made_leaves_none_and_the_next_run_makes_it(tmp_path, monkeypatch, moment, caplog):
    target, stop = MOMENTS[moment]
    with monkeypatch.context() as patch:
        patch.setattr(target, stop)
        with pytest.raises(Stop):
            Tracker(TrackingConfig(experiment="e"), tmp_path / "outputs")
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    with caplog.at_level("INFO", logger="lab.tracking"):
        tracker = Tracker(TrackingConfig(experiment="e"), tmp_path / "outputs")
    assert f"creating the MLflow store {tmp_path / 'outputs' / 'mlflow.db'} (once" in caplog.text  # the quiet seconds, said
    tracker.start("r", {})
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.finish()
    assert tracker.client.get_run(tracker.run_id).data.metrics == {"m": 1.0}
    assert [p.name for p in (tmp_path / "outputs").glob(".mlflow.db.*.tmp")] == []  # what the stopped one left is gone


def test_a_half_built_store_gets_one_line_that_says_what_to_do(tmp_path):
    """What a store killed mid-creation held before stores were made whole: the tables of a migration
    whose version was never recorded (MLflow then fails with "table secrets already exists")."""
    import sqlalchemy

    from lab.tracking import ensure_sqlite_store

    store = tmp_path / "outputs" / "mlflow.db"
    ensure_sqlite_store(f"sqlite:///{store}")  # no MLflow client has it open (it caches stores by name)
    engine = sqlalchemy.create_engine(f"sqlite:///{store}")
    with engine.begin() as db:
        db.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = 'bf29a5ff90ea'"))  # before the secrets tables
        db.execute(sqlalchemy.text("DROP TABLE metrics"))
    engine.dispose()
    with pytest.raises(TrackingError, match=re.escape(f"{store} is not a usable MLflow store (")) as err:
        Tracker(TrackingConfig(experiment="e"), tmp_path / "outputs")
    assert f"mv {store} {store}.broken" in str(err.value) and "\n" not in str(err.value)
