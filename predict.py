"""Classify your own digits with a model exported by train.py.

  python predict.py --model_dir runs/conv/saved_model seven.png photo_of_a_3.jpg digits.json
  python predict.py --model_dir runs/conv/saved_model --inputs=a.png,b.jpg --save_preview=seen.png --top_k=3
  python predict.py --model_dir runs/colour/saved_model images.npy      # a model of other images: raw arrays

Inputs: pictures of one digit (PNG, JPEG, ... any size, dark on light or light on dark), converted the way MNIST
was made (app/digits.py), or the codelab's digits.json (one {"image": 28x28 floats in [0, 1]} per line); that
preprocessing is for models of 28x28 grey digits. For any model: .npy arrays of one image [H, W, C] or a batch
[N, H, W, C] of the model's image shape: uint8 0..255, other integers 0..255 (read as pixels, with a note),
or floats in [0, 1]. Every input is checked before the model sees it (type, NaN, range, shape); a .npy file is
memory-mapped and classified BATCH images at a time, so its size does not bound what fits in memory.
Prints one line per image:  <input>: <class>  (<class>: <probability>  ...top_k...)
Errors are one line each on stderr, naming the input: exit code 1 for an input or model that cannot be used
(the other inputs are still classified), 2 for bad flags (unknown flag, missing --model_dir, no inputs, --top_k
outside 1..10).
"""
import dataclasses
import sys

from absl import app, flags

from app import digits
from app.inputs import (BATCH, InputError, as_model_input, classify, describe, find_saved_model, fit_to_model,
                        load_classifier, read_input)
from core import cli

PROGRAM = "predict.py"


class UsageError(Exception):
    """Bad command line (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What to classify with which model, and how to print it: one flag per field."""
    model_dir: str | None = cli.option(None, "SavedModel directory written by train.py (<run dir>/saved_model, "
                                       "or --export_dir), or a TensorFlow Serving model directory of numbered "
                                       "versions (highest used).", required=True)
    inputs: tuple = cli.option((), "Comma-separated input files, classified before the positional ones: images "
                               "(PNG, JPEG, ...) or digits.json files (.json/.jsonl/.ndjson).")
    save_preview: str | None = cli.option(None, "Write a PNG of what the model saw: the 28x28 inputs, 4x bigger, "
                                          "white on black, each captioned with its predicted class.")
    top_k: int = cli.option(3, "How many classes (with probabilities) to print per digit.", bounds=(1, 10))


cli.define_flags(PredictConfig)
flags.adopt_module_key_flags(cli)  # --help lists them as predict.py's
FLAGS = flags.FLAGS


def error(message):
    cli.error(PROGRAM, message)


def run(paths, config=None):
    """Classifies every input of `paths` (after config.inputs), BATCH images at a time, with `config` (default:
    the parsed flags); returns the exit code (0, or 1 if any input or the model failed)."""
    config = config or cli.from_flags(PredictConfig)
    paths = list(config.inputs) + list(paths)
    if not paths:
        raise UsageError("no inputs: give image or digits.json files as arguments or with --inputs")
    saved_model_dir = find_saved_model(config.model_dir)
    inputs, failed = [], False
    for path in paths:
        try:
            inputs += read_input(path)
        except digits.DigitError as e:
            error(e)
            failed = True
        except Exception as e:  # whatever one input does (RecursionError, MemoryError, ...), the others still run
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            error(f"{path}: cannot use this input ({reason})")
            failed = True
    if not inputs:
        return 1
    try:
        classifier = load_classifier(saved_model_dir)
    except Exception as e:
        error(e)
        return 1
    digit_model = tuple(classifier.image_shape) == (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1)
    classified, shown, shown_classes = 0, [], []
    for name, x, is_picture in inputs:
        try:
            names, batch = fit_to_model(name, x, is_picture, classifier.image_shape)
            for start in range(0, len(batch), BATCH):
                images = as_model_input(batch[start:start + BATCH])
                probabilities, classes = classify(classifier, images)
                for image_name, predicted, p in zip(names[start:start + BATCH], classes, probabilities):
                    print(describe(image_name, int(predicted), [float(v) for v in p], config.top_k))
                sys.stdout.flush()
                classified += len(images)
                if config.save_preview and digit_model:
                    shown += list(images)
                    shown_classes += [int(c) for c in classes]
        except digits.DigitError as e:
            error(e)
            failed = True
        except Exception as e:  # the model failing on one input: the others are still classified
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            error(f"{name}: cannot classify this input ({reason})")
            failed = True
    if not classified:
        return 1
    if config.save_preview and not digit_model:
        error(f"--save_preview {config.save_preview}: previews show 28x28 grey digits; this model takes "
              f"{'x'.join(map(str, classifier.image_shape))} images")
        return 1
    if config.save_preview:
        try:
            digits.preview(shown, [f"{c}" for c in shown_classes]).save(config.save_preview, format="PNG")
        except (OSError, ValueError) as e:
            error(f"--save_preview {config.save_preview}: cannot write ({getattr(e, 'strerror', None) or e})")
            return 1
    return 1 if failed else 0


def main(argv):
    try:
        return run(argv[1:])
    except UsageError as e:
        error(e)
        return 2
    except (InputError, digits.DigitError) as e:
        error(e)
        return 1
    except Exception as e:
        error(f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
