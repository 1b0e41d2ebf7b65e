"""train.py's command run in the test's own process, its flags parsed afresh: what the CLI tests share."""
import types

from absl import flags


def train_command(*args, capsys=None):
    """train.py's command with `args` -> (returncode, stdout, stderr) as a CompletedProcess-like namespace;
    `capsys`: pytest's fixture, which reads the console (without it, stdout and stderr are empty)."""
    import train
    from core import cli
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    try:
        code = train.command(cli.parse("train.py", ["train.py", *args], flag_values), flag_values)
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr() if capsys else ("", "")
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
