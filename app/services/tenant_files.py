"""Reading a tenant's files (local model directories, calibration and evaluation files): this module owns the rule.

Only regular files that resolve inside an allowed root (MOPEQ_MODEL_ROOTS) are read or copied, whatever their name:
weights, configs, tokenizer, processor, chat template and remote-code files alike. The API checks a model
directory at submit (``model_files``: a 422 naming the file), and the worker checks again when it opens the files
(``snapshot_model_dir``): it opens each resolved path with O_NOFOLLOW, then checks the file it actually holds (its
type, and where the kernel says it lives), and gives the engine a private copy of the directory made from those
open files. A symlink made after the submit check is therefore never followed out of the roots.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from mopeq_core.errors import UserInputError

MAX_FILES = 10_000  # a model directory with more entries is refused (and a symlink loop ends here)


class PathRefused(UserInputError):
    """A tenant's file that may not be read: outside the allowed roots, or not a regular file."""


def inside(p: Path, roots: list[Path]) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


def _refuse(where: str, rel: str, why: str) -> PathRefused:
    return PathRefused(f"{where}: '{rel}' {why}; only regular files inside the server's model roots "
                       "(MOPEQ_MODEL_ROOTS) are read. Replace the link with a copy of the file.")


def model_files(src: Path, roots: list[Path], *, where: str = "model") -> list[tuple[str, Path]]:
    """(name relative to ``src``, resolved path) of every file in the model directory, subdirectories included.
    Raises PathRefused for any entry that resolves outside the roots or is not a regular file or directory."""
    src = src.resolve()
    if not inside(src, roots):
        raise _refuse(where, ".", "is outside the allowed roots")
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for dirpath, dirs, files in os.walk(src, followlinks=True):
        real_dir = Path(dirpath).resolve()
        rel_dir = Path(dirpath).relative_to(src)
        if not inside(real_dir, roots):
            raise _refuse(where, rel_dir.as_posix(), "is a directory link that leads outside the allowed model roots")
        if real_dir in seen:
            dirs.clear()  # a link back to a directory already read: nothing new there
            continue
        seen.add(real_dir)
        for name in files:
            rel = (rel_dir / name).as_posix()
            real = (Path(dirpath) / name).resolve()
            if not inside(real, roots):
                raise _refuse(where, rel, "is a link that leads outside the allowed model roots")
            try:
                mode = os.stat(real).st_mode
            except OSError:
                raise _refuse(where, rel, "is a broken link") from None
            if not stat.S_ISREG(mode):
                raise _refuse(where, rel, "is not a regular file")
            out.append((rel, real))
        if len(out) + len(seen) > MAX_FILES:
            raise PathRefused(f"{where} holds more than {MAX_FILES} files; a model directory holds a model")
    return out


def open_checked(path: Path, roots: list[Path], *, where: str = "file") -> int:
    """A read-only descriptor of ``path`` (already resolved), after checking the file it opened: a regular file
    that lives inside the roots. The last component is never followed (O_NOFOLLOW), and the location is read back
    from the open descriptor, so a link swapped in after any earlier check is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _refuse(where, path.name, f"cannot be opened safely ({exc.strerror}; links are not followed)") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(where, path.name, "is not a regular file")
        held = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not inside(held, roots):
            raise _refuse(where, path.name, "leads outside the allowed roots")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_file(path: Path, roots: list[Path], *, where: str = "file") -> None:
    """Check a tenant's data file as the worker opens it (see open_checked)."""
    os.close(open_checked(path.resolve(), roots, where=where))


def snapshot_model_dir(src: Path, dst: Path, roots: list[Path], *, where: str = "model") -> Path:
    """A private copy of the model directory in ``dst`` (hard links where the filesystem allows, else copies),
    made only from files checked as they were opened. Returns ``dst``."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for rel, real in model_files(src, roots, where=where):
        fd = open_checked(real, roots, where=where)
        try:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:  # the inode just checked, not whatever the name points at now
                os.link(f"/proc/self/fd/{fd}", target, follow_symlinks=True)
            except OSError:
                with os.fdopen(os.dup(fd), "rb") as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
        finally:
            os.close(fd)
    return dst
