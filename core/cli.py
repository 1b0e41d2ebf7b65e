"""What every entry point (train.py, predict.py, serve.py) does alike: one-line errors, absl flags declared from
a dataclass of settings, and a parser whose errors are one line with exit code 2 (absl's own parser prints the
usage and exits 1).

    define_flags(RunConfig, flags.FLAGS)          # one flag per field: its type, default, help, choices, check
    config = from_flags(PredictConfig)            # the dataclass of the parsed flags
    app.run(main, flags_parser=flags_parser("train.py"))

A field is a core.config.setting, or an `option` where a flag needs more: integer bounds, a required value.
A field typed tuple is a comma-separated list flag.
"""
import dataclasses
import re
import sys
import typing

from absl import flags

from core.config import problem, setting


def error(program, message):
    """`program: error: message` on stderr, folded onto one line."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def fail(program, message, code, is_error=True):
    """One line on stderr (`program: error: message`, or `program: message` for a deliberate stop), then exit
    with `code`."""
    sys.stdout.flush()
    if is_error:
        error(program, message)
    else:
        print(f"{program}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def option(default, help, check=None, choices=None, bounds=None, required=False):
    """A setting (core.config.setting) with what only a command line has: bounds (low, high) of an integer
    (absl's own range message) and required (the flag must be given)."""
    field = setting(default, help, check, choices=choices)
    return dataclasses.field(default=default, metadata={**field.metadata, "bounds": bounds, "required": required})


def define_flags(settings, flag_values=flags.FLAGS, per_model_note=""):
    """One flag per field of the dataclass `settings`: its type, help and check come from the field's metadata
    (core.config.setting), an enum where it has choices. A field a model may set (per_model) defaults to None
    (= not given, so the model's value can fill it) and its help ends with `per_model_note`."""
    for field in dataclasses.fields(settings):
        _define(field, flag_values, per_model_note)


def _define(field, flag_values, per_model_note):
    per_model = field.metadata.get("per_model")
    default = None if per_model else field.default
    help_text = field.metadata["help"] + (per_model_note if per_model else "")
    kind = next(t for t in (tuple, str, bool, int, float)
                if field.type is t or t in typing.get_args(field.type) or typing.get_origin(field.type) is t)
    low, high = field.metadata.get("bounds") or (None, None)
    if field.metadata.get("choices"):
        flags.DEFINE_enum(field.name, default, list(field.metadata["choices"]), help_text, flag_values=flag_values)
    elif kind is tuple:
        flags.DEFINE_list(field.name, list(default), help_text, flag_values=flag_values)
    elif kind is int:
        flags.DEFINE_integer(field.name, default, help_text, lower_bound=low, upper_bound=high,
                             flag_values=flag_values)
    else:
        define = {bool: flags.DEFINE_bool, float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
        define(field.name, default, help_text, flag_values=flag_values)
    if field.metadata.get("required"):
        flags.mark_flag_as_required(field.name, flag_values=flag_values)

    def check(value):
        text = None if value is None else problem(field, value)
        if text:
            raise flags.ValidationError(f"--{field.name} {text}")
        return True

    flags.register_validator(field.name, check, flag_values=flag_values)


def given(settings, flag_values=flags.FLAGS, extra=()):
    """{flag name: value} of the flags of the dataclass `settings` and the flags named in `extra`; None for a
    per-model flag that was not given."""
    return {name: flag_values[name].value for name in flag_values
            if name in settings.__dataclass_fields__ or name in extra}


def from_flags(settings, flag_values=flags.FLAGS):
    """The dataclass `settings` with the value of each of its flags (a list flag as a tuple)."""
    values = given(settings, flag_values)
    return settings(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def parse(program, argv, flag_values=flags.FLAGS):
    """The remaining arguments of `argv` after its flags; a bad value or unknown flag is one error line and exit
    code 2."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        # A failed check reads "flag --seed=-1: --seed must be ...": keep the part that names the flag once.
        fail(program, re.sub(r"^flag --(\w+)=.*?: (?=--\1 )", "", str(e)), 2)


def flags_parser(program):
    """A flags_parser for absl.app.run: parse() on the global flags."""
    return lambda argv: parse(program, argv)
