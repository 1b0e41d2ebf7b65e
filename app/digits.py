"""Turn a user's picture of a digit into an MNIST input: 28x28 float32, white ink on black, values in [0, 1].

MNIST was made (LeCun, Cortes, Burges) from NIST's black-and-white digits: each was scaled to fit a 20x20 box
keeping its aspect ratio (the grey levels come from the anti-aliasing of that scaling), then placed in a 28x28
field so that its centre of mass sits at the centre. `to_mnist` does the same to any picture:

  1. grey   g = 0.299 R + 0.587 G + 0.114 B in [0, 1]   (transparent pixels: composited on a contrasting colour)
  2. polarity: the background is the median of the border frame; the ink is the extreme (darkest or lightest
     pixel) farthest from it; dark ink is flipped, g = 1 - g, so the ink is light as in MNIST
  3. contrast: x = clip((g - background) / (ink - background), 0, 1), then the nearly bilevel
     x = clip((x - 0.25) / 0.5, 0, 1), like NIST's black-and-white source (pen and paper noise gone, edges kept);
     pictures of 64 px and more also lose isolated specks (3x3 median filter)
  4. bounding box of the ink (x > 0), cropped
  5. strokes thinner than MNIST's are thickened (a max filter) so that they are at least 2 px wide after step 6
  6. scaled so that the longer side is 20 px, aspect ratio kept, anti-aliased (bilinear over the whole footprint)
  7. pasted into 28x28 so that the centre of mass (row, col) = sum(p * index) / sum(p) lands on (14, 14)
     (integer shift, as MNIST's: its centres of mass are 14.0 +- 0.5), then scaled so the brightest pixel is 1.

Every picture costs a bounded amount of memory and time, whatever its bytes declare: more than MAX_PIXELS pixels
(after a JPEG's reduced-scale decoding) or an aspect ratio beyond MAX_ASPECT:1 is refused from the header, before
decoding, and a decoded picture is shrunk (box filter) to at most WORK_SIDE px a side before step 1's floats.

The codelab's digits.json (one JSON object per line, {"image": 28x28 floats in [0, 1]}) is already in MNIST
form and is only checked, not transformed.
"""
import json
import math
import os
import stat

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, ImageStat, UnidentifiedImageError

IMAGE_SIZE = 28
BOX_SIZE = 20
CENTRE = 14.0
MIN_CONTRAST = 0.15
MIN_STROKE = 2.0
TARGET_STROKE = 2.8
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
# Larger pictures are refused before they are decoded (a small PNG can decode to gigabytes); JPEGs are first
# decoded at a reduced scale (PIL's draft), which brings most photos under the budget.
MAX_PIXELS = 50_000_000
# A digit is at most this elongated (MNIST's narrowest 1s are about 20 x 2 px of ink, in a picture with margins).
MAX_ASPECT = 20
# The preparation works on pictures of at most WORK_SIDE x WORK_SIDE pixels (25x MNIST's 20 px box): its
# memory and time are O(WORK_SIDE^2) whatever the picture's size; larger pictures are shrunk first (box filter:
# a 1 px stroke fades by the shrinking factor, and reads as blank in pictures above WORK_SIDE / MIN_CONTRAST,
# about 3,400 px).
WORK_SIDE = 512
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


class DigitError(ValueError):
    """An input that cannot be turned into a digit; the message is one line naming the input and the problem."""


class NotAPicture(DigitError):
    """Bytes that are no picture format PIL knows."""


class PictureTooLarge(DigitError):
    """A picture of more pixels than the budget, refused from its header before decoding."""


def open_regular(path):
    """Opens `path` for reading in binary, refusing anything but a regular file (DigitError): a FIFO would
    block, a device read forever. Opened without blocking, then checked on the open descriptor (no race)."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DigitError(f"{name}: no such file") from None
    except OSError as e:
        raise DigitError(f"{name}: cannot read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "not a regular file"
        raise DigitError(f"{name}: is {kind}, not a file to read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def load_grey(path):
    """Reads an image file (PNG, JPEG, ...) -> grey float32 [H, W] in [0, 1] (EXIF rotation applied), at most
    WORK_SIDE px a side; refused from its header (DigitError) as read_grey refuses."""
    name = os.fspath(path)
    with open_regular(name) as f:
        return read_grey(f, name)


def prepare(source, name, max_pixels=None):
    """A binary file object or bytes stream of a picture of one digit -> MNIST-style x [28, 28] float32 in
    [0, 1]: read_grey then to_mnist, in memory and time bounded by `max_pixels` (decoding, default MAX_PIXELS)
    and WORK_SIDE (preparation) whatever the bytes declare. Raises PictureTooLarge above the pixel budget,
    NotAPicture for bytes PIL cannot read, DigitError (one line naming `name`) for any other unusable picture."""
    return to_mnist(read_grey(source, name, max_pixels), name)


def read_grey(source, name, max_pixels=None):
    """A binary file object or bytes stream of a picture (PNG, JPEG, ...) -> grey float32 [H, W] in [0, 1], as
    load_grey. Refused from the header, before any pixel is decoded: more than `max_pixels` pixels after a
    JPEG's reduced-scale decoding (PictureTooLarge; default MAX_PIXELS), an aspect ratio beyond MAX_ASPECT:1
    (DigitError). The decoded picture is shrunk to at most WORK_SIDE px a side. `name` names it in errors."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(source) as image:
            if image.width * image.height > max_pixels:
                image.draft(image.mode, _scaled_size(image.size, max_pixels / 4))
            if image.width * image.height > max_pixels:
                raise PictureTooLarge(f"{name}: picture of {image.width:,} x {image.height:,} pixels is larger "
                                      f"than {max_pixels / 1_000_000:g} megapixels; scale it down first")
            _check_aspect(image.size, name)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            g = _grey(image)
    except DigitError:
        raise
    except UnidentifiedImageError:
        raise NotAPicture(f"{name}: cannot read image (not a picture format PIL knows)") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DigitError(f"{name}: cannot read image ({reason})") from None
    if not np.isfinite(g).all():
        raise DigitError(f"{name}: image has NaN or infinite values")
    return g


def _check_aspect(size, name):
    """DigitError for a picture (w, h) more elongated than MAX_ASPECT:1, or without pixels."""
    w, h = size
    if min(w, h) == 0:
        raise DigitError(f"{name}: picture of {w:,} x {h:,} pixels has no pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise DigitError(f"{name}: picture of {w:,} x {h:,} pixels is more elongated than {MAX_ASPECT}:1, "
                         f"not one digit; crop it to the digit")


def _scaled_size(size, pixels):
    """(w, h) shrunk by one factor to at most `pixels` pixels. (draft decodes at the smallest power-of-two
    scale at least this size: asked for a quarter of the budget, it stays under the budget.)"""
    factor = math.sqrt(pixels / (size[0] * size[1]))
    return max(1, int(size[0] * factor)), max(1, int(size[1] * factor))


def _work_size(size):
    """(w, h) shrunk by one factor so that the longer side is at most WORK_SIDE (each side at least 1)."""
    scale = min(1.0, WORK_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _shrunk(image):
    """A PIL image ("L" or "F") at most WORK_SIDE px a side, box-filtered: each pixel the mean of its footprint,
    so a thin stroke stays, fainter, and step 3 stretches its contrast back."""
    size = _work_size(image.size)
    return image if size == image.size else image.resize(size, Image.BOX)


def _grey(image):
    """PIL image -> g [H, W] float32 in [0, 1], at most WORK_SIDE px a side: any mode (palette, CMYK, 16-bit,
    float), alpha composited on the colour that contrasts with the ink. Made at full size in 8-bit PIL images
    (or one float image for 16-bit and float pictures), then shrunk: the floats are O(WORK_SIDE^2)."""
    if image.mode in HIGH_DEPTH_MODES:
        f = image.convert("F")
        brightest = f.getextrema()[1]
        top = 1.0 if image.mode == "F" and brightest <= 1.0 else 255.0 if brightest <= 255 else 65535.0
        return np.clip(np.asarray(_shrunk(f), dtype=np.float32) / np.float32(top), 0.0, 1.0)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
        (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        grey = image if image.mode == "L" else image.convert("L")
        return np.asarray(_shrunk(grey), dtype=np.float32) / np.float32(255)
    rgba = image.convert("RGBA")
    g, alpha = rgba.convert("L"), rgba.getchannel("A")
    del rgba
    if alpha.getextrema()[0] < 255:
        opaque = alpha.point(lambda a: 255 if a > 127 else 0)
        ink = ImageStat.Stat(g, mask=opaque).mean[0] / 255 if opaque.getbbox() else 0.0
        background = Image.new("L", g.size, 255 if ink < 0.5 else 0)
        g = Image.composite(g, background, alpha)
    return np.asarray(_shrunk(g), dtype=np.float32) / np.float32(255)


def to_mnist(grey, name="image"):
    """Grey picture [H, W] (floats in [0, 1] or uint8) of one digit -> MNIST-style x [28, 28] float32 in [0, 1].

    Raises DigitError (naming `name`) for a wrong shape, an aspect ratio beyond MAX_ASPECT:1 or a blank
    picture. A picture larger than WORK_SIDE px a side is shrunk first. See the module docstring.
    """
    g = np.asarray(grey)
    if g.dtype == np.uint8:
        g = g.astype(np.float32) / 255.0
    g = g.astype(np.float32, copy=False)
    if g.ndim == 3 and g.shape[-1] == 1:
        g = g[..., 0]
    if g.ndim != 2 or g.size == 0:
        raise DigitError(f"{name}: expected a 2-D grey image, got shape {list(g.shape)}")
    _check_aspect(g.shape[::-1], name)
    if not np.isfinite(g).all():
        raise DigitError(f"{name}: image has NaN or infinite values")
    g = _shrunk_array(g)
    x = _ink(g, name)
    if min(x.shape) >= 64:
        x = _despeckle(x)
    rows, cols = _bbox(x)
    x = x[rows, cols]
    x = _thicken(x)
    return _centre(_scale_to_box(x))


def _shrunk_array(g):
    """g [H, W] float32 at most WORK_SIDE px a side (box filter)."""
    return g if max(g.shape) <= WORK_SIDE else np.asarray(_shrunk(Image.fromarray(g)))


def _ink(g, name):
    """Background -> 0, ink -> 1, whatever the polarity (steps 2 and 3)."""
    frame = max(1, min(g.shape) // 20)
    border = np.concatenate([g[:frame].ravel(), g[-frame:].ravel(), g[:, :frame].ravel(), g[:, -frame:].ravel()])
    background = float(np.median(border))
    darkest, lightest = float(g.min()), float(g.max())
    if background - darkest > lightest - background:
        g, background, lightest = 1.0 - g, 1.0 - background, 1.0 - darkest
    contrast = lightest - background
    if contrast < MIN_CONTRAST:
        raise DigitError(f"{name}: blank image, no digit found (contrast {contrast:.2f} < {MIN_CONTRAST})")
    x = np.clip((g - background) / contrast, 0.0, 1.0)
    return np.clip((x - 0.25) / 0.5, 0.0, 1.0)


def _despeckle(x):
    """Removes isolated specks (paper grain, JPEG noise) with a 3x3 median filter, unless that would erase
    most of the ink (strokes 1 px wide)."""
    filtered = np.asarray(Image.fromarray(x).filter(ImageFilter.MedianFilter(3)))
    return filtered if filtered.sum() >= 0.5 * x.sum() else x


def _bbox(x):
    """Row and column slices of the smallest box holding every pixel > 0."""
    rows = np.flatnonzero(x.any(axis=1))
    cols = np.flatnonzero(x.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def stroke_width(x):
    """Mean stroke width in pixels of the ink (x > 0.5): 2 * area / boundary (a 1-px stroke reads as 2)."""
    ink = x > 0.5
    area = int(ink.sum())
    if area == 0:
        return 0.0
    p = np.pad(ink, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return 2.0 * area / int((ink & ~inner).sum())


def _thicken(x):
    """Step 5: if the strokes would be thinner than MIN_STROKE px once scaled into the 20x20 box, max-filter
    them to TARGET_STROKE px (a median MNIST stroke): k = odd size of the square max filter."""
    scale = BOX_SIZE / max(x.shape)
    width = stroke_width(x)
    if width * scale >= MIN_STROKE:
        return x
    k = 2 * math.ceil((TARGET_STROKE / scale - width) / 2) + 1
    r = k // 2
    x = np.pad(x, r)
    x = _max_filter(x, k)
    rows, cols = _bbox(x)
    return x[rows, cols]


def _max_filter(x, k):
    """y[i, j] = max of x over the k x k square centred on (i, j): a running max along rows, then columns."""
    return _running_max(_running_max(x, k, axis=0), k, axis=1)


def _running_max(x, k, axis):
    """y[i] = max(x[i - k//2 .. i + k//2]) along `axis` (zeros outside), in O(n) for any odd k (van Herk /
    Gil-Werman): in blocks of k, prefix maxima g and suffix maxima h give y[i] = max(h[i], g[i + k - 1])."""
    x = np.moveaxis(x, axis, 0)
    n, r = x.shape[0], k // 2
    length = -(-(n + 2 * r) // k) * k
    p = np.zeros((length,) + x.shape[1:], x.dtype)
    p[r:r + n] = x
    blocks = p.reshape((length // k, k) + x.shape[1:])
    g = np.maximum.accumulate(blocks, axis=1).reshape(p.shape)
    h = np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].reshape(p.shape)
    return np.moveaxis(np.maximum(h[:n], g[k - 1:k - 1 + n]), 0, axis)


def _scale_to_box(x):
    """Step 6: longer side -> 20 px, aspect ratio kept; bilinear (anti-aliased when shrinking)."""
    h, w = x.shape
    scale = BOX_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.clip(np.asarray(Image.fromarray(x.astype(np.float32)).resize(size, Image.BILINEAR)), 0.0, 1.0)


def center_of_mass(x):
    """(row, col) = sum(x * index) / sum(x) over the pixels of x [H, W] (index coordinates)."""
    x = np.asarray(x, dtype=np.float64).reshape(np.shape(x)[0], np.shape(x)[1])
    total = x.sum()
    rows = np.arange(x.shape[0])
    cols = np.arange(x.shape[1])
    return float((x.sum(axis=1) * rows).sum() / total), float((x.sum(axis=0) * cols).sum() / total)


def _centre(patch):
    """Step 7: paste into 28x28 with the centre of mass on (14, 14), kept inside the field; brightest -> 1."""
    h, w = patch.shape
    row, col = center_of_mass(patch)
    top = min(max(round(CENTRE - row), 0), IMAGE_SIZE - h)
    left = min(max(round(CENTRE - col), 0), IMAGE_SIZE - w)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    out[top:top + h, left:left + w] = patch
    return out / out.max()


def read_digits_json(path):
    """The codelab's digits.json -> [(name, x [28, 28] float32)].

    One JSON object per line, {"image": 28x28 floats in [0, 1]} (also accepted: [28, 28, 1], 784 flat values,
    a batch of those under one "image", a TensorFlow Serving body {"instances": [...]}, or one multi-line
    JSON document). Names are "file:line" ("file:line[k]" inside a batch).
    """
    name = os.fspath(path)
    with open_regular(name) as f:
        try:
            raw = f.read()
        except OSError as e:
            raise DigitError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DigitError(f"{name}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        records = _json_records(name, text)
    except RecursionError:
        raise DigitError(f"{name}: JSON nested too deeply") from None
    if not records:
        raise DigitError(f"{name}: no images (expected one {{\"image\": 28x28 floats}} per line)")
    digits = []
    for where, record in records:
        digits += _json_images(where, record)
    return digits


def _json_records(name, text):
    """[(name:line, value)] from JSON lines, or from one JSON document if the file is not JSON lines."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{name}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            if records:
                raise DigitError(f"{name}:{number}: not valid JSON ({e.msg})") from None
            try:
                document = json.loads(text)
            except json.JSONDecodeError as e2:
                raise DigitError(f"{name}:{e2.lineno}: not valid JSON ({e2.msg})") from None
            records = [(name, document)]
            break
    if len(records) == 1 and isinstance(records[0][1], dict) and "instances" in records[0][1]:
        where, document = records[0]
        instances = document["instances"]
        if not isinstance(instances, list):
            raise DigitError(f"{where}: \"instances\" must be a list")
        records = [(f"{where}[{k}]", item) for k, item in enumerate(instances)]
    return records


def _json_images(where, record):
    """One record ({"image": ...} or a bare nested list) -> [(name, x [28, 28])], checked."""
    if isinstance(record, dict):
        if "image" not in record:
            raise DigitError(f"{where}: expected an object with key \"image\", got keys {sorted(record)[:5]}")
        record = record["image"]
    try:
        x = np.asarray(record, dtype=np.float32)
    except (ValueError, TypeError, RecursionError):
        raise DigitError(f"{where}: \"image\" is not a rectangular array of numbers") from None
    shape = list(x.shape)
    if shape in ([28, 28], [28, 28, 1], [784]):
        batch = [x.reshape(28, 28)]
        names = [where]
    elif len(shape) >= 2 and shape[1:] in ([28, 28], [28, 28, 1], [784]) and shape[0] > 0:
        batch = list(x.reshape(-1, 28, 28))
        names = [f"{where}[{k}]" for k in range(shape[0])]
    else:
        raise DigitError(f"{where}: \"image\" has shape {shape}, expected [28, 28] "
                         f"(or [28, 28, 1], [784], or a batch [N, 28, 28])")
    out = []
    for name, image in zip(names, batch):
        if not np.isfinite(image).all():
            raise DigitError(f"{name}: image has NaN or infinite values")
        if image.min() < 0.0 or image.max() > 1.0:
            raise DigitError(f"{name}: pixel values must be in [0, 1], found [{image.min():g}, {image.max():g}] "
                             f"(divide 0..255 pixels by 255)")
        if image.max() < MIN_CONTRAST:
            raise DigitError(f"{name}: blank image, no digit found (brightest pixel {image.max():.2f})")
        out.append((name, image))
    return out


def read_inputs(path):
    """A user's input file -> [(name, x [28, 28] float32 in [0, 1])]: digits.json lines, or one image file."""
    name = os.fspath(path)
    if name.lower().endswith(JSON_SUFFIXES):
        return read_digits_json(name)
    with open_regular(name) as f:
        return [(name, prepare(f, name))]


def preview(images, captions=(), scale=4, columns=10):
    """What the model saw: the 28x28 images as a grid of tiles (white on black, `scale`x bigger), each with
    its caption underneath -> PIL image (mode "L")."""
    images = [np.asarray(x, dtype=np.float32).reshape(IMAGE_SIZE, IMAGE_SIZE) for x in images]
    if not images:
        raise ValueError("preview: no images")
    captions = list(captions) + [""] * (len(images) - len(captions))
    tile = IMAGE_SIZE * scale
    caption_height = 16 if any(captions) else 0
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    gap = 2
    sheet = Image.new("L", (columns * (tile + gap) + gap, rows * (tile + caption_height + gap) + gap), 96)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for k, (x, caption) in enumerate(zip(images, captions)):
        left = gap + (k % columns) * (tile + gap)
        top = gap + (k // columns) * (tile + caption_height + gap)
        picture = Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8))
        sheet.paste(picture.resize((tile, tile), Image.NEAREST), (left, top))
        if caption:
            draw.rectangle([left, top + tile, left + tile - 1, top + tile + caption_height - 1], fill=0)
            draw.text((left + 3, top + tile + 2), caption, fill=255, font=font)
    return sheet
