"""Writes a benchmark's figures into benchmarks/RESULTS.md, in the section of the command that measured them.

Each section sits between `<!-- <command> -->` and `<!-- end -->`: running the same command again replaces its
section, a new command appends one. The section says the command and the machine (CPU model, cores, the flags
that decide bfloat16 speed, whether TensorFlow runs oneDNN, TensorFlow version, date, load), so every figure in
RESULTS.md carries both.
"""
import datetime
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
END = "<!-- end -->"
BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_flags():
    """(model name, {flag: present}) for the flags that decide bfloat16 speed."""
    name, present = "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, {flag: False for flag in BF16_FLAGS}
    for line in text.splitlines():
        if line.startswith("model name") and name == "unknown CPU":
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            break
    return name, {flag: flag in present for flag in BF16_FLAGS}


def onednn():
    """"oneDNN on" / "oneDNN off" as this TensorFlow decided (on by default only on CPUs with AVX512_VNNI,
    AVX512_BF16, AVX_VNNI or AMX), with TF_ENABLE_ONEDNN_OPTS if it is set."""
    from tensorflow.python.util import _pywrap_util_port
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return (f"oneDNN {'on' if _pywrap_util_port.IsMklEnabled() else 'off'}"
            + (f" (TF_ENABLE_ONEDNN_OPTS={setting})" if setting is not None else " (TensorFlow's default)"))


def load():
    """The load average over 1, 5 and 15 minutes, e.g. "0.4 0.9 1.2"."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def command():
    """The command line that ran this script, e.g. `python benchmarks/bench_models.py --models=conv`."""
    script = Path(sys.argv[0]).name
    return " ".join(["python", f"benchmarks/{script}"] + [shlex.quote(arg) for arg in sys.argv[1:]])


def machine():
    """CPU model, cores, bfloat16 flags, oneDNN's state, TensorFlow version, today's date and the load average at
    the end, as one line."""
    import tensorflow as tf
    cpu, bf16 = cpu_flags()
    flags = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in bf16.items())
    return (f"{cpu}, {os.cpu_count()} cores ({flags}), {onednn()}, "
            f"TensorFlow {tf.__version__}, {datetime.date.today().isoformat()}, load average {load()} (1, 5, 15 "
            f"min) at the end (the cores may be shared)")


def record(title, body):
    """Replaces (or appends) this command's section of RESULTS.md with `title`, command, machine and `body`."""
    start = f"<!-- {command()} -->"
    section = (f"{start}\n### {title}\n\nCommand: `{command()}`  \nMachine: {machine()}\n\n"
               f"{body.strip()}\n{END}")
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    begin = text.find(start)
    if begin < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        finish = text.index(END, begin) + len(END)
        text = text[:begin] + section + text[finish:]
    RESULTS.write_text(text)
    print(f"\nwritten to {RESULTS} ({start})")
