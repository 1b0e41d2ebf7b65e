"""predict.py and app/digits.py: users' pictures become MNIST digits whatever their size and polarity,
digits.json is read as the codelab wrote it, and every bad input is one clear line with a non-zero exit code."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from app import digits

REPO = Path(__file__).resolve().parents[1]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SIZES = [(50, 50), (200, 120), (600, 600)]
LINE = re.compile(r"^(?P<name>.+): (?P<cls>\d)  \((?P<top>(\d: [01]\.\d{4}(  )?)+)\)$")


def render(text, size, dark_on_light=True, where=(0.5, 0.5), height=0.7):
    """A digit typed with DejaVu Sans, `height` of the smaller side tall, centred at `where` (fractions)."""
    w, h = size
    background, ink = (255, 0) if dark_on_light else (0, 255)
    image = Image.new("L", size, background)
    font = ImageFont.truetype(FONT, int(min(w, h) * height))
    ImageDraw.Draw(image).text((w * where[0], h * where[1]), text, fill=ink, font=font, anchor="mm")
    return image


def draw_seven(size, width, dark_on_light=True):
    """A "7" drawn with two lines of `width` pixels."""
    w, h = size
    background, ink = (255, 0) if dark_on_light else (0, 255)
    image = Image.new("L", size, background)
    ImageDraw.Draw(image).line([(0.25 * w, 0.15 * h), (0.75 * w, 0.15 * h), (0.4 * w, 0.88 * h)], fill=ink,
                               width=width)
    return image


def grey(image):
    return np.asarray(image, dtype=np.float32) / 255.0


def distance(a, b):
    """Mean absolute difference, allowing a shift of one pixel (centring rounds to whole pixels)."""
    return min(np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).mean() for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def assert_mnist_like(x):
    assert x.shape == (28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    row, col = digits.center_of_mass(x)
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1
    rows, cols = np.flatnonzero(x.max(axis=1) > 0), np.flatnonzero(x.max(axis=0) > 0)
    assert 19 <= max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 22
    assert x[0].max() == x[-1].max() == x[:, 0].max() == x[:, -1].max() == 0.0


@pytest.mark.parametrize("digit", list("0123456789"))
def test_same_digit_whatever_the_size_position_and_polarity(digit):
    reference = digits.to_mnist(grey(render(digit, (200, 200))))
    assert_mnist_like(reference)
    for size in SIZES:
        for where in [(0.5, 0.5), (0.35, 0.6)]:
            for dark_on_light in (True, False):
                x = digits.to_mnist(grey(render(digit, size, dark_on_light, where)))
                assert_mnist_like(x)
                assert distance(x, reference) < 0.05, (size, where, dark_on_light)


def test_uint8_rgb_and_transparent_pictures_give_the_same_digit(tmp_path):
    base = render("4", (160, 160))
    reference = digits.to_mnist(grey(base))
    np.testing.assert_array_equal(digits.to_mnist(np.asarray(base)), reference)
    base.convert("RGB").save(tmp_path / "rgb.png")
    rgba = Image.new("RGBA", base.size, (0, 0, 0, 0))
    rgba.putalpha(Image.eval(base, lambda v: 255 - v))
    rgba.save(tmp_path / "ink_on_transparent.png")
    base.save(tmp_path / "photo.jpg", quality=80)
    for name in ["rgb.png", "ink_on_transparent.png", "photo.jpg"]:
        ((_, x),) = digits.read_inputs(tmp_path / name)
        assert distance(x, reference) < 0.03, name


def test_thin_pen_strokes_are_thickened_to_mnist_strokes():
    sevens = [digits.to_mnist(grey(draw_seven((600, 600), width, dark))) for width in (1, 3, 30)
              for dark in (True, False)]
    for x in sevens:
        assert_mnist_like(x)
        assert 2.0 <= digits.stroke_width(x) <= 4.5
        assert distance(x, sevens[-1]) < 0.06


def test_photo_like_picture_noisy_paper_and_blue_ink(tmp_path):
    """Off-white paper with a shadow gradient and sensor noise, blue ballpoint ink, saved as JPEG."""
    clean = digits.to_mnist(grey(draw_seven((300, 300), 12)))
    ink = np.asarray(draw_seven((1200, 900), 10), np.float32)[..., None] / 255.0
    paper = np.array([235, 228, 215], np.float32) * np.linspace(1.0, 0.8, 1200)[None, :, None]
    pen = np.array([40, 50, 140], np.float32)
    picture = ink * paper + (1 - ink) * pen + np.random.default_rng(0).normal(0, 6, (900, 1200, 3))
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(tmp_path / "photo.jpg", quality=85)
    ((_, x),) = digits.read_inputs(tmp_path / "photo.jpg")
    assert_mnist_like(x)
    assert distance(x, clean) < 0.06


def test_mnist_digits_come_back_as_they_were(mnist_dir):
    """MNIST digits were made by this very procedure: blown up 10x and inverted, they come back."""
    from quick_mnist_model import mnist_test_set

    images, _ = mnist_test_set(mnist_dir)
    errors = []
    for image in images[:50]:
        big = Image.fromarray(255 - image).resize((280, 280), Image.BICUBIC)
        errors.append(distance(digits.to_mnist(grey(big)), image / 255.0))
    assert np.mean(errors) < 0.04 and max(errors) < 0.15


def test_digits_json_as_the_codelab_writes_it(tmp_path):
    one = np.zeros((28, 28)).tolist()
    one[10][14] = one[11][14] = 1.0
    path = tmp_path / "digits.json"
    path.write_text(json.dumps({"image": one}) + "\n\n" + json.dumps({"image": np.array(one)[..., None].tolist()})
                    + "\n" + json.dumps({"image": np.ravel(one).tolist()})
                    + "\n" + json.dumps({"image": [one, one]}) + "\n")
    got = digits.read_digits_json(path)
    assert [name for name, _ in got] == [f"{path}:1", f"{path}:3", f"{path}:4", f"{path}:5[0]", f"{path}:5[1]"]
    for _, x in got:
        np.testing.assert_array_equal(x, np.array(one, np.float32))
    serving_body = tmp_path / "request.json"
    serving_body.write_text(json.dumps({"instances": [{"image": one}, {"image": one}]}, indent=2))
    assert [name for name, _ in digits.read_inputs(serving_body)] == [f"{serving_body}[0]", f"{serving_body}[1]"]


@pytest.mark.parametrize("content, message", [
    ('{"image": [[0.5, 0.5], [0.5, 0.5]]}', r"digits.json:1: \"image\" has shape \[2, 2\], expected \[28, 28\]"),
    ('{"pixels": []}', r"digits.json:1: expected an object with key \"image\""),
    ('{"image": ' + json.dumps(np.full((28, 28), 255).tolist()) + "}", r"must be in \[0, 1\].*divide"),
    ('{"image": ' + json.dumps(np.zeros((28, 28)).tolist()) + "}", r"digits.json:1: blank image"),
    ('{"image": ' + json.dumps(np.ones((28, 28)).tolist()) + '}\n{"image": [1, 2', r"digits.json:2: not valid JSON"),
    ("", r"digits.json: no images"),
])
def test_digits_json_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "digits.json"
    path.write_text(content)
    with pytest.raises(digits.DigitError, match=message) as raised:
        digits.read_digits_json(path)
    assert "\n" not in str(raised.value)


@pytest.fixture(scope="module")
def model_dir(mnist_dir, tmp_path_factory):
    from app import export
    from quick_mnist_model import train_quick_model

    model, _ = train_quick_model(mnist_dir)
    return export.export_saved_model(model, tmp_path_factory.mktemp("predict") / "export")


def predict(*args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def predict_here(capfd, monkeypatch, *args, cwd):
    """predict.py's main in this process, run in `cwd` (its flags parsed as app.run parses them):
    SimpleNamespace(returncode, stdout, stderr), file descriptors 1 and 2 captured."""
    import predict as predict_module

    monkeypatch.chdir(cwd)
    predict_module.FLAGS.unparse_flags()
    argv = predict_module.FLAGS(["predict.py", *map(str, args)])
    code = predict_module.main(argv)
    out, err = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def parse(stdout):
    lines = stdout.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return {m["name"]: (int(m["cls"]), [(int(c), float(p)) for c, p in re.findall(r"(\d): ([\d.]+)", m["top"])])
            for m in matches}


def test_predict_classifies_rendered_digits_and_digits_json(model_dir, mnist_dir, tmp_path, capfd,
                                                             monkeypatch):
    from quick_mnist_model import mnist_test_set

    files, truth = [], {}
    for digit in "0123456789":
        for k, (size, dark, ext) in enumerate([((50, 50), True, "png"), ((200, 120), False, "jpg"),
                                               ((600, 600), False, "png")]):
            path = tmp_path / f"{digit}_{k}.{ext}"
            render(digit, size, dark).save(path)
            files.append(path.name)
            truth[path.name] = int(digit)
    images, labels = mnist_test_set(mnist_dir)
    with open(tmp_path / "digits.json", "w") as f:
        for image in images[:10]:
            f.write(json.dumps({"image": (image / 255.0).tolist()}) + "\n")
    preview = tmp_path / "seen.png"
    result = predict_here(capfd, monkeypatch, "--model_dir", model_dir, "--save_preview", preview, "--top_k=5",
                          f"--inputs={files[0]},{files[1]}", *files[2:], "digits.json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    predictions = parse(result.stdout)
    assert list(predictions) == files + [f"digits.json:{i}" for i in range(1, 11)]
    for cls, top in predictions.values():
        assert len(top) == 5 and top[0][0] == cls
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        assert 0.0 <= sum(p for _, p in top) <= 1.0001
    typed_right = sum(predictions[name][0] == digit for name, digit in truth.items())
    assert typed_right >= 0.7 * len(truth), typed_right
    assert sum(predictions[f"digits.json:{i + 1}"][0] == labels[i] for i in range(10)) >= 8
    assert Image.open(preview).size == (10 * 114 + 2, 4 * (112 + 16 + 2) + 2)


def test_predict_reports_bad_inputs_and_classifies_the_rest(model_dir, tmp_path, capfd, monkeypatch):
    render("3", (90, 90)).save(tmp_path / "three.png")
    render("7", (90, 90)).save(tmp_path / "seven.png")
    Image.new("L", (64, 64), 230).save(tmp_path / "blank.png")
    (tmp_path / "latin1.json").write_bytes(b'{"image": "caf\xe9"}\n')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "pipe.png")
    result = predict_here(capfd, monkeypatch, "--model_dir", model_dir, "three.png", "blank.png", "latin1.json",
                          "deep.json", "pipe.png", "/dev/zero", "seven.png", "--top_k=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "predict.py: error: blank.png: blank image, no digit found (contrast 0.00 < 0.15)",
        "predict.py: error: latin1.json:1: not UTF-8 text (byte 0xe9 at offset 14)",
        "predict.py: error: deep.json: JSON nested too deeply",
        "predict.py: error: pipe.png: is a FIFO, not a file to read",
        "predict.py: error: /dev/zero: is a device, not a file to read"]
    assert list(parse(result.stdout)) == ["three.png", "seven.png"]


def test_one_input_failing_in_an_unexpected_way_does_not_take_the_others_down(tmp_path, monkeypatch, capsys):
    import predict as predict_module

    render("3", (90, 90)).save(tmp_path / "three.png")
    real = digits.read_inputs

    def explode(path):
        if str(path).endswith("bad.png"):
            raise MemoryError("simulated")
        return real(path)

    monkeypatch.setattr(digits, "read_inputs", explode)
    monkeypatch.setattr(predict_module, "classify", lambda _, images: (np.full((len(images), 10), 0.1),
                                                                       np.zeros(len(images), np.int64)))
    monkeypatch.setattr(predict_module, "find_saved_model", lambda path: path)
    monkeypatch.setattr(predict_module, "load_classifier", lambda path: SimpleNamespace(image_shape=(28, 28, 1)))
    predict_module.FLAGS(["predict.py", "--model_dir=unused"])
    assert predict_module.run([str(tmp_path / "bad.png"), str(tmp_path / "three.png")]) == 1
    out, err = capsys.readouterr()
    assert err == f"predict.py: error: {tmp_path}/bad.png: cannot use this input (MemoryError: simulated)\n"
    assert list(parse(out)) == [str(tmp_path / "three.png")]


def test_a_decompression_bomb_is_refused_from_its_header_fast_and_small(tmp_path):
    """13,300 x 13,300 pixels in a 20 KB PNG would decode to 177 MB (and gigabytes as floats)."""
    Image.new("1", (13_300, 13_300)).save(tmp_path / "bomb.png", compress_level=1)
    script = ("import re, sys, time\n"
              "from app import digits\n"
              "started = time.monotonic()\n"
              "try:\n"
              "    digits.read_inputs(sys.argv[1])\n"
              "except digits.DigitError as e:\n"
              "    print(e)\n"
              "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
              "print(time.monotonic() - started, int(peak) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bomb.png")], cwd=REPO, text=True,
                            capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    message, figures = result.stdout.splitlines()
    assert message == (f"{tmp_path}/bomb.png: picture of 13,300 x 13,300 pixels is larger than 50 megapixels; "
                       f"scale it down first")
    seconds, megabytes = float(figures.split()[0]), int(figures.split()[1])
    assert seconds < 1.0 and megabytes < 100, figures  # peak resident memory of the whole process


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    render("5", (400, 400)).convert("RGB").save(tmp_path / "five.jpg", quality=95)
    ((_, full),) = digits.read_inputs(tmp_path / "five.jpg")
    monkeypatch.setattr(digits, "MAX_PIXELS", 12_000)  # 400 x 400 = 160,000: drafted at 1/4 -> 100 x 100
    ((_, drafted),) = digits.read_inputs(tmp_path / "five.jpg")
    assert distance(drafted, full) < 0.05
    Image.new("L", (400, 400), 255).save(tmp_path / "big.png")
    with pytest.raises(digits.DigitError, match=r"big.png: picture of 400 x 400 pixels is larger than 0.012 megapixels"):
        digits.read_inputs(tmp_path / "big.png")  # no draft for PNG: refused


def test_float_pictures_in_0_to_1_are_not_blank(tmp_path):
    reference = digits.to_mnist(grey(render("2", (120, 120))))
    g = np.asarray(render("2", (120, 120)), np.float32) / 255.0
    Image.fromarray(g, mode="F").save(tmp_path / "float01.tif")
    Image.fromarray(g * 255.0, mode="F").save(tmp_path / "float255.tif")
    for name in ("float01.tif", "float255.tif"):
        ((_, x),) = digits.read_inputs(tmp_path / name)
        assert distance(x, reference) < 0.01, name


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(digits.DigitError, match=r"fifo.json: is a FIFO, not a file to read$"):
        digits.read_inputs(tmp_path / "fifo.json")
    with pytest.raises(digits.DigitError, match=r"^/dev/null: is a device, not a file to read$"):
        digits.read_inputs("/dev/null")
    with pytest.raises(digits.DigitError, match=r"is a directory, not a file to read$"):
        digits.read_inputs(tmp_path)


@pytest.mark.parametrize("setup, args, code, message", [
    ("garbage", ["--model_dir", "{model}", "broken.png"], 1, r"broken.png: cannot read image"),
    (None, ["--model_dir", "{model}", "missing.png"], 1, r"missing.png: no such file"),
    ("wrong_shape", ["--model_dir", "{model}", "digits.json"], 1, r"digits.json:1: \"image\" has shape \[28, 27\]"),
    ("blank", ["--model_dir", "{model}", "blank.jpg"], 1, r"blank.jpg: blank image, no digit found"),
    ("garbage", ["--model_dir", "no_such_dir", "broken.png"], 1, r"--model_dir no_such_dir: no such directory"),
    ("garbage", ["--model_dir", ".", "broken.png"], 1, r"--model_dir \.: not a SavedModel"),
    (None, ["digit.png"], 2, r"--model_dir must have a value"),
    (None, ["--model_dir", "{model}", "--colour=red", "digit.png"], 2, r"Unknown command line flag 'colour'"),
    (None, ["--model_dir", "{model}", "--top_k=11", "digit.png"], 2, r"--top_k=11: 11 is not an integer in the range"),
    (None, ["--model_dir", "{model}"], 2, r"no inputs"),
])
def test_errors_are_one_line_with_an_exit_code(tmp_path, setup, args, code, message):
    """No model is loaded in any of these cases (inputs and flags are checked before TensorFlow starts)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"never read")
    if setup == "garbage":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    elif setup == "wrong_shape":
        (tmp_path / "digits.json").write_text(json.dumps({"image": np.zeros((28, 27)).tolist()}) + "\n")
    elif setup == "blank":
        Image.new("RGB", (300, 200), (250, 250, 245)).save(tmp_path / "blank.jpg")
    result = predict(*[a.format(model=model) for a in args], cwd=tmp_path)
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("predict.py: error: ")
    assert re.search(message, lines[0]), lines[0]


def test_every_array_is_checked_before_the_model_and_a_bad_one_does_not_take_the_others_down(
        model_dir, mnist_dir, tmp_path, capfd, monkeypatch):
    """NaN, out-of-range floats, strings, an empty batch: each one line naming its file; integers 0..255 of any
    type are pixels (with a note); the good inputs are all classified."""
    from quick_mnist_model import mnist_test_set

    images, _ = mnist_test_set(mnist_dir)
    render("7", (120, 120)).save(tmp_path / "grey.png")
    render("7", (120, 120)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with_nan = images[:2] / np.float32(255)
    with_nan[1, 14, 14] = np.nan
    arrays = {"nan.npy": with_nan, "int64.npy": images[:3].astype(np.int64), "uint8.npy": images[:3],
              "floats255.npy": images[:2].astype(np.float32), "strings.npy": np.array(["seven"]),
              "empty.npy": np.zeros((0, 28, 28), np.uint8), "negative.npy": images[:2].astype(np.int16) - 1}
    for name, array in arrays.items():
        np.save(tmp_path / name, array)
    result = predict_here(capfd, monkeypatch, "--model_dir", model_dir, "--top_k=10", "grey.png", "cmyk.jpg",
                          *arrays, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "predict.py: error: nan.npy: the array has NaN or infinite values",
        "predict.py: note: int64.npy: int64 values read as pixels 0..255 (divided by 255)",
        "predict.py: error: floats255.npy: float32 values must be in [0, 1], found [0, 255] (divide 0..255 pixels "
        "by 255)",
        "predict.py: error: strings.npy: an array of <U5; expected pixels: integers 0..255 (uint8) or floats in "
        "[0, 1]",
        "predict.py: error: empty.npy: an empty array of shape [0, 28, 28], no images",
        "predict.py: error: negative.npy: int16 values must be pixels 0..255, found [-1, 254]"]
    predictions = parse(result.stdout)
    assert list(predictions) == ["grey.png", "cmyk.jpg", "int64.npy:1", "int64.npy:2", "int64.npy:3",
                                 "uint8.npy:1", "uint8.npy:2", "uint8.npy:3"]
    for i in (1, 2, 3):
        assert predictions[f"int64.npy:{i}"] == predictions[f"uint8.npy:{i}"]
    (grey_class, grey), (cmyk_class, cmyk) = predictions["grey.png"], predictions["cmyk.jpg"]
    assert cmyk_class == grey_class
    assert max(abs(p - dict(grey)[c]) for c, p in cmyk) < 0.02


def test_a_large_array_is_memory_mapped_and_classified_in_batches(model_dir, mnist_dir, tmp_path, capfd,
                                                                  monkeypatch):
    """20,000 images (the MNIST training set as .npy once took 8.2 GB as one batch): the model sees at most
    BATCH of them at a time, and this process holds no copy of the file, nor of it as floats."""
    import tracemalloc

    import predict as predict_module
    from quick_mnist_model import mnist_test_set

    images, labels = mnist_test_set(mnist_dir)
    np.save(tmp_path / "big.npy", np.concatenate([images, images]))
    classifier = predict_module.load_classifier(model_dir)
    batches = []

    def classify(classifier, images):
        batches.append((len(images), images.dtype, float(images.min()), float(images.max())))
        return classifier(images)

    monkeypatch.setattr(predict_module, "load_classifier", lambda path: classifier)
    monkeypatch.setattr(predict_module, "classify", classify)
    tracemalloc.start()
    try:
        result = predict_here(capfd, monkeypatch, "--model_dir", model_dir, "--top_k=1", "big.npy", cwd=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert result.returncode == 0 and result.stderr == ""
    assert [n for n, _, _, _ in batches] == [1000] * 20
    assert all(dtype == np.float32 and 0.0 <= low and high <= 1.0 for _, dtype, low, high in batches)
    predictions = parse(result.stdout)
    assert list(predictions) == [f"big.npy:{i}" for i in range(1, 20_001)]
    classes = np.array([cls for cls, _ in predictions.values()])
    np.testing.assert_array_equal(classes[:10_000], classes[10_000:])
    assert (classes[:10_000] == labels).mean() > 0.85
    assert peak < 20_000 * 28 * 28, peak  # less than the file (15.7 MB; 62.7 MB as floats); a batch is 3.1 MB
