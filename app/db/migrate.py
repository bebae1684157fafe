"""Run Alembic migrations from code (``python -m app.serve`` and the tests use this)."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def migrations_dir() -> Path:
    """migrations/ beside the source tree (editable installs, the Docker image), or MOPEQ_MIGRATIONS_DIR."""
    return Path(os.environ.get("MOPEQ_MIGRATIONS_DIR") or ROOT / "migrations")


def alembic_config(database_url: str) -> Config:
    ini = ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
