"""What the package relies on from the machine it runs on: a writable per-user cache folder,
the CPU's identity (for cache keys) and atomic file replacement.

The cache folder is the first of these that can be created and written to:

1. ``$SWITCHSAE_CACHE`` (an empty value counts as unset);
2. ``~/.cache/switchsae``;
3. ``<temp dir>/switchsae-<uid>``, created private (mode 0700) and used only if this user owns it,
   since compiled code is loaded from it.

A folder skipped because it cannot be written gets one warning naming it and the reason, so a
missing or read-only home directory slows nothing down and breaks nothing.
"""
from __future__ import annotations

import functools
import os
import platform
import secrets
import tempfile
import warnings
from pathlib import Path
from typing import Callable

#: where the CPU's model name and feature flags are read from (Linux)
CPUINFO = Path("/proc/cpuinfo")
#: cpuinfo lines naming the CPU's features: x86 says "flags", Arm says "Features"
FLAG_FIELDS = ("flags", "features")


def cache_dir(*parts: str) -> Path:
    """``<cache root>/<parts...>``, created if missing (see the module docstring for the root)."""
    folder = _cache_root(os.environ.get("SWITCHSAE_CACHE", ""), os.environ.get("HOME", "")).joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def _cache_root(configured: str, home: str) -> Path:
    """The first usable cache root for this ``$SWITCHSAE_CACHE`` and ``$HOME`` (cached per pair)."""
    candidates = [Path(configured)] if configured else []
    skipped = []
    try:
        candidates.append(Path.home() / ".cache" / "switchsae")
    except RuntimeError:  # no $HOME and no passwd entry
        skipped.append("~/.cache/switchsae unusable (no home folder)")
    private = Path(tempfile.gettempdir()) / f"switchsae-{os.getuid()}"
    for folder in [*candidates, private]:
        problem = _unusable(folder, private=folder == private)
        if problem is None:
            if skipped:
                warnings.warn(f"switchsae: cache folder {'; '.join(skipped)}; using {folder}", stacklevel=2)
            return folder
        skipped.append(f"{folder} unusable ({problem})")
    raise OSError(f"no writable cache folder: {'; '.join(skipped)}; set SWITCHSAE_CACHE to a writable folder")


def _unusable(folder: Path, private: bool) -> str | None:
    """Why ``folder`` cannot serve as the cache root, or None if it can (it is created here)."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    except OSError as err:
        return err.strerror or str(err)
    if private and folder.stat().st_uid != os.getuid():
        return "owned by another user"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable"
    return None


def cpu_identity() -> tuple[str, str]:
    """``(model name, feature flags)`` of this CPU from ``/proc/cpuinfo``; ``""`` for whatever
    cannot be read (no such file, or a format without the field). On x86 the name carries the
    family and model numbers, since a virtual machine's name ("AMD EPYC") hides the generation."""
    try:
        lines = CPUINFO.read_text(errors="replace").splitlines()
    except OSError:
        return "", ""
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("cpu model") or fields.get("cpu part", "")
    if model and "cpu family" in fields and "model" in fields:
        model = f"{model} (family {fields['cpu family']}, model {fields['model']})"
    flags = next((fields[name] for name in FLAG_FIELDS if fields.get(name)), "")
    return model or platform.processor(), flags


def cpu_name() -> str:
    """This CPU's name for benchmark tables: :func:`cpu_identity`'s, else the machine type."""
    return cpu_identity()[0] or platform.machine()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` by ``write(tmp)`` on a uniquely named temporary file in the same folder
    (created with the usual umask-based permissions), fsynced, then ``os.replace``d over ``path``:
    readers, and concurrent writers, never see half a file, a crash leaves the old file, and a
    failed write (a full disk) leaves no temporary file behind. The one atomic write of the package."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (:func:`write_atomic`)."""
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)
    write_atomic(path, write)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_atomic`)."""
    write_bytes_atomic(path, text.encode())
