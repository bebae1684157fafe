"""``mopeq admin ...``: operator commands that talk to the database directly (no server needed).

The lead mounts ``app`` into the main CLI (``main_app.add_typer(app, name="admin")``); standalone:
``python -m app.cli_admin create-key NAME``."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Operate a MoPEQ service: API keys and database migrations.", no_args_is_help=True)


def _factory():
    from app.core.config import get_settings
    from app.db.migrate import upgrade
    from app.db.session import make_engine, make_sessionmaker

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings, make_sessionmaker(make_engine(settings.database_url))


@app.command("create-key")
def create_key_cmd(
    name: str = typer.Argument(..., help="Who or what the key is for"),
    scope: str = typer.Option("user", help="user (own jobs) or admin (all jobs, key management)"),
    rate_limit: int | None = typer.Option(None, help="Requests per minute (default MOPEQ_RATE_LIMIT_PER_MINUTE)"),
    max_jobs: int | None = typer.Option(None, help="Queued+running jobs at once (default MOPEQ_MAX_CONCURRENT_JOBS)"),
    storage_quota: int | None = typer.Option(None, "--storage-quota", min=0,
                                             help="Most artifact bytes the key's jobs may hold (default: no quota)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Create an API key and print it (it is shown once; only its HMAC is stored)."""
    from app.core.security import Keyring
    from app.services.keys import create_key

    if scope not in ("user", "admin"):
        raise typer.BadParameter("scope must be user or admin")
    settings, factory = _factory()
    row, secret = create_key(factory, Keyring(settings.secret_key()), name=name, scope=scope,
                             rate_limit_per_minute=rate_limit, max_concurrent_jobs=max_jobs,
                             storage_quota_bytes=storage_quota)
    if as_json:
        typer.echo(json.dumps({"id": row.id, "name": row.name, "scope": row.scope, "api_key": secret}))
    else:
        typer.echo(secret)
        typer.echo(f"key id {row.id} ({scope}) created for '{name}'; store the key now, it is not shown again",
                   err=True)


@app.command("list-keys")
def list_keys_cmd() -> None:
    """List API keys (ids, names, scopes; never the keys)."""
    from sqlalchemy import select

    from app.db.models import ApiKey

    _, factory = _factory()
    with factory() as db:
        for k in db.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            typer.echo(f"{k.id}\t{k.scope}\t{state}\t{k.name}")


@app.command("revoke-key")
def revoke_key_cmd(key_id: str) -> None:
    """Revoke an API key by its id."""
    from app.db.models import ApiKey, utcnow

    _, factory = _factory()
    with factory() as db, db.begin():
        row = db.get(ApiKey, key_id)
        if row is None:
            typer.echo(f"no key {key_id}", err=True)
            raise typer.Exit(1)
        row.revoked_at = row.revoked_at or utcnow()
    typer.echo(f"revoked {key_id}")


@app.command("set-quota")
def set_quota_cmd(
    key_id: str,
    storage_quota: int | None = typer.Argument(None, min=0, help="Bytes; leave out to remove the quota"),
) -> None:
    """Set (or remove) an API key's storage quota: the most artifact bytes its jobs may hold."""
    from app.services.keys import set_storage_quota

    _, factory = _factory()
    if set_storage_quota(factory, key_id, storage_quota) is None:
        typer.echo(f"no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {key_id}: storage quota {'none' if storage_quota is None else f'{storage_quota:,} bytes'}")


@app.command("migrate")
def migrate_cmd(revision: str = typer.Argument("head")) -> None:
    """Upgrade the database schema (``python -m app.serve`` does this on start)."""
    from app.core.config import get_settings
    from app.db.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    typer.echo("database is at " + revision)


if __name__ == "__main__":
    app()
