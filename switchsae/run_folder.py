"""A run folder while a process trains into it: locked, writable, and nothing lost to ``--force``.

- **Lock**: ``run.lock`` in the folder, an exclusive non-blocking ``flock``. The kernel releases it
  when its holder dies, so a crashed process never leaves a stale lock. It is re-entrant within a
  process: a sweep holding a run's lock calls :func:`switchsae.train.train` on that run.
- **Writable**: the folder is created and a probe file written (and removed) before any work, so
  an unwritable, read-only or full location fails before the first step, not at the first
  checkpoint.
- **Never overwritten**: a folder holding any of a run's outputs is refused unless the run
  resumes it or is forced.
- **Forced**: the previous outputs move into ``.replaced/`` and are deleted once the new run has
  written its first checkpoint; a run that ends before that (an error, Ctrl-C) puts them back. A
  process killed in between leaves ``.replaced/`` behind: the next claim restores it if no
  checkpoint of the new run sits beside it, and deletes it otherwise.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from switchsae.checkpoint import read_checkpoint_meta

LOCK_FILE = "run.lock"
REPLACED = ".replaced"
_HELD: set[Path] = set()  # run folders whose lock this process holds


class RunFolderBusy(OSError):
    """Another process holds the run folder's lock."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on ``run_dir``; yields False if another process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _HELD:
        yield True
        return
    with open(run_dir / LOCK_FILE, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        _HELD.add(key)
        try:
            yield True
        finally:
            _HELD.discard(key)
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it; OSError naming the folder if either fails."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            try:
                fh.write(b"switchsae write probe\n")
                os.fsync(fh.fileno())
            finally:
                probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the run folder {folder}: {err.strerror or err}") from None


class RunClaim:
    """What a training run holds on its folder: the last checkpoint it wrote, and whether a
    replaced run waits in ``.replaced/`` for that first checkpoint."""

    def __init__(self, run_dir: Path | None, checkpoint: str = ""):
        self.run_dir, self.checkpoint = run_dir, checkpoint
        self.checkpoint_step: int | None = None
        self.replacing = False

    def checkpointed(self, step: int) -> None:
        """Record a checkpoint at ``step``; the first one makes replacing the old run final."""
        self.checkpoint_step = step
        if self.replacing and self.run_dir is not None:
            shutil.rmtree(self.run_dir / REPLACED)
            self.replacing = False

    def _step_on_disk(self) -> int:
        """The step of the checkpoint in the folder: an interrupt can land after a checkpoint's
        atomic replace but before :meth:`checkpointed` recorded it."""
        assert self.run_dir is not None and self.checkpoint_step is not None
        try:
            return int(read_checkpoint_meta(self.run_dir / self.checkpoint)["step"])
        except (OSError, ValueError):
            return self.checkpoint_step

    def outcome(self) -> str:
        """What a run that stops now leaves behind, for its error message."""
        if self.run_dir is None:
            return "nothing was saved (no run folder)"
        if self.checkpoint_step is not None:
            return f"the last checkpoint (step {self._step_on_disk()}) is intact in {self.run_dir}"
        if self.replacing:
            return f"no checkpoint was written, so the run that was in {self.run_dir} before --force is restored"
        return f"no checkpoint was written to {self.run_dir}"


@contextmanager
def claim_run_dir(run_dir: Path | None, outputs: tuple[str, ...], checkpoint: str, resume: bool = False,
                  force: bool = False) -> Iterator[RunClaim]:
    """Claim ``run_dir`` for one training run (see the module docstring); None claims nothing.

    ``outputs`` are the file names a run writes, ``checkpoint`` the one that makes it resumable.
    """
    if run_dir is None:
        yield RunClaim(None)
        return
    check_writable(run_dir)
    with run_lock(run_dir) as mine:
        if not mine:
            raise RunFolderBusy(f"{run_dir} is in use by another switchsae process (it holds {run_dir / LOCK_FILE}); "
                                "wait for it to finish or choose another --out")
        _recover_replaced(run_dir, outputs, checkpoint)
        claim = RunClaim(run_dir, checkpoint)
        claim.replacing = not resume and _move_aside(run_dir, outputs, force)
        try:
            yield claim
        except BaseException:
            if claim.replacing:
                _restore(run_dir, outputs)
            raise


def _move_aside(run_dir: Path, outputs: tuple[str, ...], force: bool) -> bool:
    """Apply the never-overwrite rule; with ``force`` move the outputs present into ``.replaced/``.
    Returns whether anything was moved."""
    present = [name for name in outputs if (run_dir / name).exists()]
    if not present:
        return False
    if not force:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or --force to overwrite it")
    (run_dir / REPLACED).mkdir()
    for name in present:
        os.replace(run_dir / name, run_dir / REPLACED / name)
    return True


def _restore(run_dir: Path, outputs: tuple[str, ...]) -> None:
    """Put the outputs in ``.replaced/`` back, over whatever the replacing run left."""
    for name in outputs:
        (run_dir / name).unlink(missing_ok=True)
    for path in (run_dir / REPLACED).iterdir():
        os.replace(path, run_dir / path.name)
    (run_dir / REPLACED).rmdir()


def _recover_replaced(run_dir: Path, outputs: tuple[str, ...], checkpoint: str) -> None:
    """Settle a ``.replaced/`` left by a killed forced run: restore it unless that run checkpointed."""
    if not (run_dir / REPLACED).exists():
        return
    if (run_dir / checkpoint).exists():
        shutil.rmtree(run_dir / REPLACED)
    else:
        _restore(run_dir, outputs)
