"""The rules of a run directory: <logdir>/<run_name> is claimed (locked) by one process; a run that holds
checkpoints is resumed only with the settings it was started with (RESUME_KEYS) and never started over; the
export directories are checked before any training; a signal's one line says what was kept and how to resume."""
import dataclasses
import os

from app.settings import RESUME_KEYS, FlagError, RunConfig
from core import rundir

__all__ = ["claim_run_dir", "check_resume", "check_export_dirs", "resume_hint", "interrupted"]


def claim_run_dir(config, program="train.py"):
    """Claims <logdir>/<run_name> for this process (locked until it ends; a new unique name by default) ->
    rundir.RunDir; FlagError (one line) if the directory is in use or cannot be used."""
    try:
        return rundir.claim(config.logdir, config.run_name, prefix=config.model, program=program)
    except rundir.RunDirError as error:
        raise FlagError(str(error)) from None


def check_resume(config, run_dir):
    """Whether run_dir holds checkpoints to resume; FlagError if it may not be resumed with these settings.
    A run that holds checkpoints is never started over: its config.json must be readable and agree."""
    from core.checkpoint import holds_checkpoints
    if not holds_checkpoints(os.path.join(run_dir, "checkpoints")):
        return False
    if not config.resume:
        raise FlagError(f"{run_dir} already holds a checkpoint; drop --noresume to continue it, "
                        f"or pass another --run_name")
    try:
        started = rundir.read_json(os.path.join(run_dir, "config.json"))
    except rundir.RunDirError as error:
        raise FlagError(str(error)) from None
    if not isinstance(started, dict):
        raise FlagError(f"{run_dir} holds checkpoints but no usable config.json to check the settings against; "
                        f"restore it, or pass another --run_name")
    settings = dataclasses.asdict(config)
    for key in RESUME_KEYS:
        now = settings[key]
        # A setting added after the run was started had its default then.
        then = started.get(key, RunConfig.__dataclass_fields__[key].default)
        if then != now:
            raise FlagError(f"{run_dir} was started with --{key}={then}, not {now}; resume "
                            f"it with the same settings or pass another --run_name")
    return True


def check_export_dirs(config, run_dir):
    """[<run dir>/saved_model, --export_dir]: absolute, ~ expanded, symlinks resolved, each checked to be
    writable and replaceable (a previous export, or nothing) before any training; FlagError otherwise.
    Staging directories a killed export left beside them are removed."""
    from app import export
    targets = [(os.path.join(run_dir, "saved_model"), "the run's saved_model")]
    if config.export_dir:
        targets.append((config.export_dir, "--export_dir"))
    checked = []
    for path, what in targets:
        try:
            checked.append(export.check_target(path))
        except export.ExportError as error:
            raise FlagError(f"{what}: {error}") from None
        export.remove_leftovers(checked[-1])
    return checked


def resume_hint(config, run_dir):
    """How to resume the run in `run_dir`: the same command, and its --run_name when the command lacks one."""
    named = "" if config.run_name else f" and --run_name={os.path.basename(run_dir)}"
    return f"resume with the same command{named}"


def interrupted(run_dir, interrupt, hint, discarded=False):
    """The one line for a run ended by a signal outside the training loop: what is kept, how to resume."""
    from core.checkpoint import on_disk
    what = f"stopped by {getattr(interrupt, 'name', 'SIGINT')}"
    if discarded:
        return f"{what} during start-up; nothing was written"
    if on_disk(os.path.join(run_dir, "checkpoints")):
        return f"{what}; the last checkpoint in {run_dir} is kept: {hint}"
    return f"{what} before the first checkpoint; nothing to resume in {run_dir}"
