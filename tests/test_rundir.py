"""core/rundir.py: run directories are claimed atomically, locked for the life of a process (across processes,
released even by SIGKILL), never a user's directory; one-line errors for everything that would fail later."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core import rundir

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from core import rundir
    run = rundir.claim(sys.argv[1], sys.argv[2], program="holder")
    print(run.path, flush=True)
    time.sleep(60)
""")


def start_holder(logdir, name):
    """A separate process that claims <logdir>/<name> and sleeps; returns it once the claim is made."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(logdir), name], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert holder.stdout.readline().strip() == str(logdir / name)
    return holder


def test_default_names_never_collide(tmp_path):
    runs = [rundir.claim(tmp_path, prefix="conv") for _ in range(5)]
    paths = [run.path for run in runs]
    assert len(set(paths)) == 5 and all(run.created for run in runs)
    base = os.path.basename(paths[0])
    assert re.fullmatch(r"conv-\d{8}-\d{6}", base)
    # Same second: the others got the base name plus 4 hex digits (a clock tick between claims gives a new base).
    assert all(re.fullmatch(r"conv-\d{8}-\d{6}(-[0-9a-f]{4})?", os.path.basename(p)) for p in paths)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    for run in runs:
        run.release()


def test_a_default_name_that_exists_gets_a_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "default_name", lambda prefix: f"{prefix}-20300102-030405")
    (tmp_path / "conv-20300102-030405").mkdir()
    (tmp_path / "conv-20300102-030405" / "mine.txt").write_text("a user's file")
    with rundir.claim(tmp_path, prefix="conv") as run:
        assert re.fullmatch(r"conv-20300102-030405-[0-9a-f]{4}", os.path.basename(run.path))
    assert os.listdir(tmp_path / "conv-20300102-030405") == ["mine.txt"]


def test_the_lock_names_its_holder_and_refuses_a_second_claim(tmp_path):
    holder = start_holder(tmp_path, "shared")
    try:
        with pytest.raises(rundir.RunDirBusy) as busy:
            rundir.claim(tmp_path, "shared")
        message = str(busy.value)
        assert "\n" not in message
        assert re.match(rf"{re.escape(str(tmp_path / 'shared'))} is in use by holder pid {holder.pid} on \S+ since "
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d; wait for it to end or choose another run name$", message)
        holder.send_signal(signal.SIGKILL)  # the kernel drops the flock with the process
        holder.wait()
        with rundir.claim(tmp_path, "shared") as run:
            assert not run.created
            assert (tmp_path / "shared" / rundir.LOCK_FILE).read_text().startswith(f"python pid {os.getpid()} ")
    finally:
        holder.kill()
        holder.wait()


def test_release_lets_the_next_claim_in(tmp_path):
    first = rundir.claim(tmp_path, "r")
    with pytest.raises(rundir.RunDirBusy):
        rundir.claim(tmp_path, "r")  # a second open file description conflicts even in the same process
    first.release()
    rundir.claim(tmp_path, "r").release()


def test_discard_removes_only_an_untouched_directory_the_claim_created(tmp_path):
    fresh = rundir.claim(tmp_path, prefix="conv")
    assert fresh.discard() and not os.path.exists(fresh.path)
    fresh.release()
    written = rundir.claim(tmp_path, "written")
    rundir.write_json(os.path.join(written.path, "config.json"), {})
    assert not written.discard() and sorted(os.listdir(written.path)) == ["config.json", "run.lock"]
    written.release()
    (tmp_path / "empty").mkdir()  # the user's empty directory, adopted: it stays
    adopted = rundir.claim(tmp_path, "empty")
    assert not adopted.created and not adopted.discard() and (tmp_path / "empty" / "run.lock").exists()
    adopted.release()
    assert sorted(os.listdir(tmp_path)) == ["empty", "written"]


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "config.json").write_text("{\"mine\": true}")
    with pytest.raises(rundir.RunDirError, match=r"photos exists and is not a run directory \(no run.lock\); it "
                                                 r"is left alone: choose another run name"):
        rundir.claim(tmp_path, "photos")
    assert os.listdir(foreign) == ["config.json"] and (foreign / "config.json").read_text() == "{\"mine\": true}"
    (tmp_path / "empty").mkdir()
    with rundir.claim(tmp_path, "empty") as run:  # an empty directory is adopted
        assert not run.created and os.listdir(run.path) == [rundir.LOCK_FILE]


def test_logdir_and_name_problems_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.RunDirError, match=r"file is a file, not a directory for runs$"):
        rundir.claim(tmp_path / "file", "r")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("x")
    with pytest.raises(rundir.RunDirError, match=r"runs/r is a file, not a run directory$"):
        rundir.claim(tmp_path / "runs", "r")
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(rundir.RunDirError, match=rf"is {limit + 1} bytes; the file system of .* allows {limit}$"):
        rundir.claim(tmp_path, "x" * (limit + 1))
    assert sorted(os.listdir(tmp_path)) == ["file", "runs"]

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(rundir.os, "mkdir", read_only)
    with pytest.raises(rundir.RunDirError, match=r"cannot create .*/runs/new: Read-only file system$"):
        rundir.claim(tmp_path / "runs", "new")


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with rundir.claim("~/runs", "r") as run:
        assert run.path == str(tmp_path / "runs" / "r")
    assert not Path("~").exists()


def test_unwritable_parts_are_found_before_the_run(tmp_path, monkeypatch):
    with rundir.claim(tmp_path, "r"):
        (tmp_path / "r" / "checkpoints").mkdir()
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: real_access(path, mode) and
                        not str(path).endswith("checkpoints"))
    with pytest.raises(rundir.RunDirError, match=r"r/checkpoints is not writable$"):
        rundir.claim(tmp_path, "r")
    monkeypatch.undo()
    rundir.claim(tmp_path, "r").release()  # the failed claim released its lock


def test_json_is_written_atomically_and_damage_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    assert rundir.read_json(path) is None
    rundir.write_json(path, {"seed": 2, "lr": 0.5})
    assert json.loads(path.read_text()) == {"seed": 2, "lr": 0.5} and os.listdir(tmp_path) == ["config.json"]
    for damage in (b"{\"seed\": 2, \"lr\"", b"\xff\xfe\x00binary", b"", b"[" * 100_000):
        path.write_bytes(damage)
        with pytest.raises(rundir.RunDirError, match=r"config.json is damaged \(.+\); restore it, or choose another "
                                                     r"run name$"):
            rundir.read_json(path)


def test_a_killed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    rundir.write_json(path, {"steps": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        rundir.write_json(path, {"steps": 2})
    assert json.loads(path.read_text()) == {"steps": 1} and os.listdir(tmp_path) == ["metrics.json"]


def test_many_processes_claiming_default_names_at_once(tmp_path):
    """Eight processes claim a default name in the same instant: eight directories, each locked by its own."""
    script = textwrap.dedent("""
        import sys, time
        from core import rundir
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        run = rundir.claim(sys.argv[1], prefix="m", program="p")
        print(run.path, flush=True)
        time.sleep(1)
    """)
    at = str(time.time() + 1.0)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), at], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO))) for _ in range(8)]
    paths = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(paths)) == 8
    pids = {int((Path(path) / rundir.LOCK_FILE).read_text().split()[2]) for path in paths}
    assert pids == {p.pid for p in procs}
