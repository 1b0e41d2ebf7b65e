"""The three entry points read their flags the same way: a dataclass of settings -> core.cli.define_flags -> the
parsed flags -> cli.from_flags -> the dataclass, which run(config) takes. A bad command line is one line, exit 2."""
import dataclasses

import pytest
from absl import flags

import predict
import serve
import train
from app.settings import RunConfig
from core import cli


def fresh(settings):
    flag_values = flags.FlagValues()
    {RunConfig: train.define_flags, predict.PredictConfig: lambda values: cli.define_flags(predict.PredictConfig,
     values), serve.ServeConfig: serve.define_flags}[settings](flag_values)
    return flag_values


@pytest.mark.parametrize("settings", [RunConfig, predict.PredictConfig, serve.ServeConfig],
                         ids=lambda s: s.__name__)
def test_each_field_is_one_flag_with_its_default_and_help(settings):
    flag_values = fresh(settings)
    for field in dataclasses.fields(settings):
        flag = flag_values[field.name]
        default = None if field.metadata.get("per_model") else field.default  # None: the model's value
        assert flag.default == (list(default) if isinstance(default, tuple) else default), field.name
        assert field.metadata["help"] in flag.help
    actions = set(train.ACTIONS) if settings is RunConfig else set()
    assert {name for name in flag_values} == {field.name for field in dataclasses.fields(settings)} | actions


def test_the_parsed_flags_are_the_dataclass():
    flag_values = fresh(predict.PredictConfig)
    rest = cli.parse("predict.py", ["predict.py", "--model_dir=m", "--inputs=a.png,b.json", "--top_k=5", "c.png"],
                     flag_values)
    assert rest == ["predict.py", "c.png"]
    assert cli.from_flags(predict.PredictConfig, flag_values) == predict.PredictConfig(
        model_dir="m", inputs=("a.png", "b.json"), save_preview=None, top_k=5)
    flag_values = fresh(serve.ServeConfig)
    cli.parse("serve.py", ["serve.py", "--model_dir=m", "--port=0", "--verbose"], flag_values)
    assert cli.from_flags(serve.ServeConfig, flag_values) == serve.ServeConfig(
        model_dir="m", host="127.0.0.1", port=0, max_busy=4, verbose=True)


@pytest.mark.parametrize("settings, args, message", [
    (predict.PredictConfig, ["--top_k=11"], "flag --top_k=11: 11 is not an integer in the range [1, 10]"),
    (predict.PredictConfig, [], "flag --model_dir=None: Flag --model_dir must have a value other than None."),
    (serve.ServeConfig, ["--port=70000"], "flag --port=70000: 70000 is not an integer in the range [0, 65535]"),
    (serve.ServeConfig, ["--max_busy=0"], "flag --max_busy=0: 0 is not an integer in the range [1, 32]"),
    (serve.ServeConfig, ["--max_busy=1000000"], "flag --max_busy=1000000: 1000000 is not an integer in the range "
                                                "[1, 32]"),
    (serve.ServeConfig, ["--host= "], "flag --host= : no address; give 127.0.0.1 (this computer), ::1, or 0.0.0.0 "
                                      "(every network)"),
    (RunConfig, ["--seed=-1"], "--seed must be in [0, 2**63), got -1"),
])
def test_a_bad_value_is_one_line_and_exit_code_2(settings, args, message, capsys):
    flag_values = fresh(settings)
    required = [] if settings is RunConfig or not args else ["--model_dir=m"]
    with pytest.raises(SystemExit) as stop:
        cli.parse("x.py", ["x.py", *required, *args], flag_values)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"x.py: error: {message}\n"


def test_the_entry_points_are_thin():
    """Flags -> config -> run(config): the work lives in app/, web/ and core/."""
    for module, most in ((train, 200), (predict, 150), (serve, 150)):
        assert len(open(module.__file__).read().splitlines()) <= most, module.__name__


@pytest.mark.parametrize("settings, module", [(RunConfig, train), (predict.PredictConfig, predict),
                                              (serve.ServeConfig, serve)], ids=lambda s: getattr(s, "__name__", ""))
def test_help_lists_each_flag_as_the_entry_points_own(settings, module):
    """absl's --help shows a program's key flags: the flags core.cli declares are adopted by the entry point."""
    flag_values = flags.FLAGS if module is predict else fresh(settings)
    key_flags = {flag.name for flag in flag_values.get_key_flags_for_module(module.__name__)}
    assert {field.name for field in dataclasses.fields(settings)} <= key_flags
