"""Real OS faults through the real command line: a read-only file system, a full one, a file-size
limit, a folder without write permission. The mounts need root (or CAP_SYS_ADMIN) and skip
cleanly without it."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import save_file

from switchsae.cli import main
from switchsae.sources.synthetic import synthetic_activations

SMALL = ["--arch", "topk", "--width", "32", "--k", "4", "--steps", "2", "--batch-size", "64", "--quiet"]
LARGE = ["--arch", "topk", "--width", "8192", "--k", "4", "--steps", "2", "--batch-size", "64", "--quiet"]


@contextmanager
def mounted(where: Path, *options: str):
    """A mount at ``where`` (``mount OPTIONS``), undone afterwards; skips the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a file system needs root")
    done = subprocess.run(["mount", *options, str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def acts(tmp_path):
    path = tmp_path / "acts.safetensors"
    save_file({"activations": synthetic_activations(1000, 16, 64, 3, seed=0)}, str(path))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and last stderr line of ``switchsae ARGV`` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_read_only_file_system(tmp_path, acts, capsys):
    main(["train", "--acts", str(acts), "--out", str(tmp_path / "rw" / "run"), *SMALL])
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path / "rw")) as ro:
        code, line = run_cli(["train", "--acts", str(acts), "--out", str(ro / "new"), *SMALL], capsys)
        assert code == 2 and "cannot write to the run folder" in line and "Read-only file system" in line, line
        code, line = run_cli(["eval", str(ro / "run"), "--acts", str(acts), "--quiet"], capsys)  # metrics.json
        assert code == 2 and line.startswith("switchsae eval: error: ") and "Read-only file system" in line, line
        code, line = run_cli(["synth", "--out", str(ro / "s.safetensors"), "--tokens", "10"], capsys)
        assert code == 2 and "Read-only file system" in line, line


def test_a_full_disk_fails_in_one_line_and_keeps_the_run_it_would_replace(tmp_path, acts, capsys):
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as disk:
        main(["train", "--acts", str(acts), "--out", str(disk / "run"), *SMALL])
        before = {f.name: f.read_bytes() for f in (disk / "run").iterdir() if f.is_file()}
        # the checkpoint of 8,192 latents (weights and moments, ~3 MB) does not fit
        code, line = run_cli(["train", "--acts", str(acts), "--out", str(disk / "run"), "--force", *LARGE], capsys)
        assert code == 2 and "No space left on device" in line, line
        after = {f.name: f.read_bytes() for f in (disk / "run").iterdir() if f.is_file()}
        assert after == before  # the old run is back, and no temporary file is left filling the disk
        assert not (disk / "run" / ".replaced").exists()
        code, line = run_cli(["train", "--acts", str(acts), "--out", str(disk / "new"), *LARGE], capsys)
        assert code == 2 and "No space left on device" in line, line
        assert sorted(p.name for p in (disk / "new").iterdir()) == ["run.lock"]


def run_switchsae(argv: list[str], prefix: tuple[str, ...] = (), **popen) -> tuple[int, str]:
    """Exit code and last stderr line of ``switchsae ARGV`` in a new process (after ``prefix``, a
    command that starts it), with this checkout first on its path."""
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([*prefix, sys.executable, "-m", "switchsae", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300, **popen)
    return done.returncode, (done.stderr.strip().splitlines() or [""])[-1]


def test_a_file_size_limit(tmp_path, acts):
    """``ulimit -f``: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))
    code, line = run_switchsae(["train", "--acts", str(acts), "--out", str(tmp_path / "run"), *LARGE], preexec_fn=limit)
    assert code == 2 and line.startswith("switchsae train: error: cannot write ") and "File too large" in line, line


def test_permission_denied(tmp_path, acts):
    """A folder its owner may not write to: root passes every permission check, so the command runs
    as root without CAP_DAC_OVERRIDE (``setpriv``), which the owner's mode bits then bind."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run without the permission-override capability")
    main(["train", "--acts", str(acts), "--out", str(tmp_path / "run"), *SMALL])
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "run").chmod(0o500)
    locked.chmod(0o500)
    try:
        without = ("setpriv", "--bounding-set", "-dac_override", "--")
        code, line = run_switchsae(["train", "--acts", str(acts), "--out", str(locked / "run"), *SMALL], without)
        assert code == 2 and "cannot write to the run folder" in line and "Permission denied" in line, line
        code, line = run_switchsae(["eval", str(tmp_path / "run"), "--acts", str(acts), "--quiet"], without)
        assert code == 2 and line.startswith("switchsae eval: error: ") and "Permission denied" in line, line
    finally:
        (tmp_path / "run").chmod(0o755)
        locked.chmod(0o755)
