"""See inside a trained model: a local web page to draw a digit and watch every layer respond.

  python serve.py --model_dir=runs/<run>/saved_model            # then open the URL it prints
  python serve.py --model_dir=runs/<run>/saved_model --port=0   # any free port

The page shows the picture the model sees (for MNIST's 28x28 prepared as predict.py prepares pictures; a grey
model of another size gets it resized, a colour model the centre of an uploaded photo), each layer's activations
captioned with its formula and shape, and the probabilities, updated while you draw. Say what the digit really
is and it shows backpropagation: the loss, dL/dx and each layer's dL/dy and weight gradients, captioned with the
backward formulas; "Teach it" applies the run's optimizer (from config.json beside saved_model/) to a copy of the
weights held in memory for the page, "Reset" restores the trained model. The SavedModel is never changed. Everything is served by this process (no internet needed); it listens on
127.0.0.1 only unless --host says otherwise (::1 for IPv6; 0.0.0.0 for every interface, with a warning: anyone
who can reach this computer can then use the page). The page's API is described in web/server.py.
Exit codes: 0 stopped with Ctrl-C; 1 a model the page cannot use or a port that cannot be bound; 2 bad flags.
"""
import dataclasses
import os
import sys

from absl import app, flags

from core import cli
from core.native_logs import load_tensorflow, quiet_native_logs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Which model the page shows and where it listens: one flag per field."""
    model_dir: str | None = cli.option(None, "SavedModel directory written by train.py (<run dir>/saved_model).",
                                       required=True)
    host: str = cli.option("127.0.0.1", "Address to listen on (127.0.0.1 or ::1 keep the page on this computer; "
                           "0.0.0.0 opens it to every network this computer is on).")
    port: int = cli.option(8000, "Port to listen on; 0 picks a free one.", bounds=(0, 65535))
    max_busy: int = cli.option(4, "Requests prepared or run at once; more are answered 503 (busy). At most 32: each "
                               "may hold a 40-megapixel picture.", bounds=(1, 32))
    verbose: bool = cli.option(False, "Print one line per HTTP request.")


def define_flags(flag_values=flags.FLAGS):
    """Declares serve.py's flags on `flag_values` (when it runs: predict.py's --model_dir is another flag)."""
    cli.define_flags(ServeConfig, flag_values)
    flags.adopt_module_key_flags(cli, flag_values=flag_values)  # --help lists them as serve.py's
    # absl's own wording ("flag --host=: no address; ..."), which shows the blank value given.
    flags.register_validator("host", lambda host: bool(host.strip()),
                             "no address; give 127.0.0.1 (this computer), ::1, or 0.0.0.0 (every network)",
                             flag_values=flag_values)

PROGRAM = "serve.py"


def error(message):
    cli.error(PROGRAM, message)


def main(argv):
    if len(argv) > 1:
        error(f"unexpected arguments {argv[1:]}; give the model with --model_dir")
        return 2
    return run(cli.from_flags(ServeConfig))


def run(config):
    """Serves the page of config.model_dir until Ctrl-C; returns the exit code (0, or 1 for a model the page
    cannot use or a port that cannot be bound)."""
    from web import server as web_server
    try:
        with quiet_native_logs(replay_on_error=False):
            load_tensorflow()
            server = web_server.make_server(config.model_dir, config.host, config.port, config.verbose,
                                            config.max_busy)
    except web_server.ModelError as e:
        error(e)
        return 1
    except OSError as e:
        error(f"cannot listen on {config.host}:{config.port} ({e.strerror or e})")
        return 1
    model = server.inspector.description["model"]
    if not server.loopback:
        print(f"{PROGRAM}: warning: listening on {config.host} beyond this computer: anyone who can reach it on "
              f"port {server.server_address[1]} can use the page", file=sys.stderr, flush=True)
    print(f"Serving {model} from {server.inspector.path} at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
