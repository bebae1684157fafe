"""The ``mopeq`` command of the light client distribution (``mopeq-client``, ``client/pyproject.toml``): the remote
service commands (submit, status, wait, cancel, bitmap, estimate, jobs, download) and their exit codes. Needs httpx,
typer and rich; never imports torch.

The full distribution's ``mopeq`` (``app/cli.py``) is this command plus the engine's ``quantize`` and the service's
``admin`` commands; this package assembles neither.
"""

from __future__ import annotations

import sys

import typer

from mopeq_client.remote_cli import (
    EXIT_AUTH,
    EXIT_CANCELLED,
    EXIT_CHECKSUM,
    EXIT_INVALID,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_PPL_REGRESSION,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    app,
    bitmap_table,
)

__all__ = ["EXIT_AUTH", "EXIT_CANCELLED", "EXIT_CHECKSUM", "EXIT_INVALID", "EXIT_JOB_FAILED", "EXIT_OK",
           "EXIT_PPL_REGRESSION", "EXIT_TIMEOUT", "EXIT_UNREACHABLE", "app", "bitmap_table", "main"]


def main(command: typer.Typer | None = None) -> None:
    """Run ``command`` (default: the light ``mopeq``); Ctrl-C exits 130."""
    try:
        (command or app)()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
