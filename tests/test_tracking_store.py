"""A new sqlite MLflow store starts from the migrated empty template (infra.tracking
.seed_sqlite_store): the same schema MLflow makes itself, migrations run once per MLflow version."""

import sqlite3

import mlflow
import mlflow.store.db.utils as db_utils
from mlflow.tracking import MlflowClient

from infra import tracking


def _schema(path) -> dict:
    """Tables with their columns (name, type, not null, primary key), indexes, schema revision."""
    with sqlite3.connect(path) as db:
        tables = [t for (t,) in db.execute("select name from sqlite_master where type = 'table'")]
        out = {t: sorted(r[1:4] + r[5:] for r in db.execute(f"pragma table_info('{t}')")) for t in tables}
        out["indexes"] = sorted(db.execute("select name, tbl_name from sqlite_master where type = 'index'"))
        out["revision"] = db.execute("select version_num from alembic_version").fetchall()
        return out


def test_new_stores_are_copies_of_one_migrated_template(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    migrations = []
    real = db_utils._initialize_tables
    monkeypatch.setattr(db_utils, "_initialize_tables", lambda e: migrations.append(e) or real(e))

    own = tmp_path / "own.db"

    MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow's own new store
    assert len(migrations) == 1
    for name in ("a", "b"):
        client = tracking.client_for(f"sqlite:///{tmp_path}/{name}/mlflow.db")
        run = client.create_run(client.create_experiment(f"exp-{name}"))
        client.log_metric(run.info.run_id, "loss", 1.0)
        assert [e.name for e in client.search_experiments()] == [f"exp-{name}", "Default"]
    assert len(migrations) == 2  # the template once, then copies
    assert _schema(tmp_path / "a" / "mlflow.db") == _schema(own)
    assert sorted(p.name for p in (tmp_path / "cache" / "restok").iterdir()) == [
        f"mlflow-{mlflow.__version__}-empty.db"
    ]


def test_an_existing_store_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    client = tracking.client_for(f"sqlite:///{store}")
    client.create_experiment("kept")
    assert tracking.seed_sqlite_store(str(store)) is True  # the copy is not linked over it
    assert "kept" in [e.name for e in tracking.client_for(f"sqlite:///{store}").search_experiments()]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_cache_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert tracking.seed_sqlite_store(str(tmp_path / "x.db")) is False
    client = tracking.client_for(f"sqlite:///{tmp_path}/y.db")
    assert client.create_experiment("made-by-mlflow")
