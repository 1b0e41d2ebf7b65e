"""serve.py's page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
draw a "1" with the mouse and a "0" with a pen (a "1" by touch at phone width), upload a photo, and check the
prediction, every layer's panel, that nothing was fetched from outside 127.0.0.1, the accessibility basics and
the phone-width layout; say a "0" is a 6 and see every layer's gradients, teach it the true label and reset it. Screenshots go to the test's temporary directory, and also to $TF_BY_HAND_SCREENSHOTS
if set. The page serves the tests' quickly trained conv model (no dropout), or the export in
$TF_BY_HAND_SERVE_MODEL. README's and docs/backprop.md's pictures, of the codelab's conv network (its 7 layers, dropout included):

  python train.py --model=conv --run_name=conv
  TF_BY_HAND_SCREENSHOTS=docs TF_BY_HAND_SERVE_MODEL=runs/conv/saved_model python -m pytest tests/test_serve_browser.py
"""
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)",
                allow_module_level=True)
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
WAIT_SECONDS = 60
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def page_url(request):
    """The URL of serve.py's page: conftest's server of the tests' conv model, or, with $TF_BY_HAND_SERVE_MODEL,
    `python serve.py --model_dir=$TF_BY_HAND_SERVE_MODEL --port=0` started here (127.0.0.1)."""
    model_dir = os.environ.get("TF_BY_HAND_SERVE_MODEL")
    if not model_dir:
        yield request.getfixturevalue("serve_url")
        return
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"--model_dir={model_dir}", "--port=0"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert " at http://" in line, f"serve.py did not start: {line!r}"
        yield line.split(" at ")[1].split()[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, page_url):
    """The page loaded and built for the model: (driver, the model's description from /api/model)."""
    with urllib.request.urlopen(page_url + "api/model", timeout=30) as response:
        model = json.load(response)
    browser.get(page_url)
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    return browser, model


def updates(driver):
    return int(driver.execute_script("return Number(document.body.dataset.updates || 0)"))


def wait_for_answer(driver, before):
    """Waits until the page has shown an answer newer than `before` and no request is in flight."""
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: updates(d) > before and d.execute_script("return document.body.dataset.busy") == "false")
    return driver.find_element(By.ID, "prediction").text


def draw(driver, strokes, kind):
    """Draws strokes (lists of (x, y) in the 280x280 pad's own pixels) with a pointer of `kind`."""
    pad = driver.find_element(By.ID, "pad")
    box = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", pad)
    scale = box[0] / 280.0
    pointer = PointerInput(kind, f"{kind}-pointer")
    actions = ActionBuilder(driver, mouse=pointer, duration=10)
    for points in strokes:
        def offset(p):
            return int(round((p[0] - 140) * scale)), int(round((p[1] - 140) * scale))
        actions.pointer_action.move_to(pad, *offset(points[0]))
        actions.pointer_action.pointer_down()
        for p in points[1:]:
            actions.pointer_action.move_to(pad, *offset(p))
        actions.pointer_action.pointer_up()
    actions.perform()


ONE = [[(150, 50), (140, 100), (135, 150), (132, 200), (130, 235)]]
ZERO = [[(140 + 55 * math.sin(2 * math.pi * t / 40), 140 - 90 * math.cos(2 * math.pi * t / 40))
         for t in range(42)]]


def clear_with_keyboard(driver):
    """Tabs from the top of the page to the Clear button and presses Enter; returns how many Tabs it took."""
    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
    body = driver.find_element(By.TAG_NAME, "body")
    for presses in range(1, 20):
        (body if presses == 1 else driver.switch_to.active_element).send_keys(Keys.TAB)
        if driver.execute_script("return document.activeElement.id") == "clear":
            driver.switch_to.active_element.send_keys(Keys.ENTER)
            return presses
    raise AssertionError("the Clear button cannot be reached with Tab")


def save_screenshot(driver, name, tmp_path):
    """Full-page PNG -> tmp_path/name (and $TF_BY_HAND_SCREENSHOTS/name); returns its bytes."""
    driver.execute_script("document.activeElement.blur()")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    data = base64.b64decode(shot["data"])
    (tmp_path / name).write_bytes(data)
    target = os.environ.get("TF_BY_HAND_SCREENSHOTS")
    if target:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    return data


def test_draw_a_one_and_a_zero_and_watch_every_layer(page, page_url, tmp_path):
    driver, model = page
    before = updates(driver)
    draw(driver, ONE, "mouse")
    assert wait_for_answer(driver, before) == "1"

    tabs = clear_with_keyboard(driver)
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.find_element(By.ID, "prediction").text == "–")
    assert tabs <= 3

    before = updates(driver)
    draw(driver, ZERO, "pen")
    assert wait_for_answer(driver, before) == "0"
    assert driver.find_element(By.ID, "status").text.startswith("Prediction: 0 (")
    best = driver.find_element(By.CSS_SELECTOR, "#probabilities li.best")
    assert best.get_attribute("data-digit") == "0"

    for layer in model["layers"]:
        panel = driver.find_element(By.CSS_SELECTOR, f'figure.layer[data-name="{layer["name"]}"]')
        canvases = panel.find_elements(By.CSS_SELECTOR, ".forward canvas")
        expected = layer["shape"][-1] if len(layer["shape"]) == 3 else 1
        assert len(canvases) == expected, layer["name"]
        caption = panel.find_element(By.TAG_NAME, "figcaption").text
        assert layer["formula"] in caption and layer["shape_text"] in caption
    assert len(driver.find_elements(By.CSS_SELECTOR, "figure.layer")) == len(model["layers"])
    lit = driver.execute_script("""
        return [...document.querySelectorAll('figure.layer')].map(panel => [...panel.querySelectorAll('canvas')]
          .some(c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 < 3 && v > 0)));
    """)
    assert all(lit), lit
    seen = driver.execute_script("""
        const c = document.getElementById('seen'), d = c.getContext('2d').getImageData(0, 0, 28, 28).data;
        let bright = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 128) bright++; return bright;
    """)
    assert 40 < seen < 400

    assert save_screenshot(driver, "serve.png", tmp_path)[:8] == b"\x89PNG\r\n\x1a\n"
    assert_only_local_requests(driver, page_url)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def assert_only_local_requests(driver, page_url):
    """Every request the browser sent (its network log and the page's resource timing) went to the server."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            sent.append(message["params"]["request"]["url"])
    sent += driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(url.endswith("/api/predict") for url in sent)
    outside = [url for url in sent if not (url.startswith(page_url) or url.startswith("data:"))]
    assert outside == []


def test_upload_a_photo(page, page_url, mnist_dir, tmp_path):
    """A test digit enlarged 10x as dark ink on light paper, chosen with the upload button: the page shows the
    class the API gives for the same file."""
    from quick_mnist_model import mnist_test_set

    driver, _ = page
    images, labels = mnist_test_set(mnist_dir)
    k = int(np.flatnonzero(labels == 7)[0])
    photo = tmp_path / "seven.png"
    Image.fromarray(255 - images[k]).resize((280, 280), Image.BILINEAR).save(photo)
    request = urllib.request.Request(page_url + "api/predict", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"png": base64.b64encode(photo.read_bytes()).decode()}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        expected = json.load(response)["class"]
    before = updates(driver)
    driver.find_element(By.ID, "upload").send_keys(str(photo))
    assert wait_for_answer(driver, before) == str(expected) == "7"


def shown(driver, what):
    """The page's last exact probabilities: "predict" (the page's model now), "before" or "after" teaching."""
    return driver.execute_script(f"return window.shown.{what}")


def counter(driver, name):
    return int(driver.execute_script(f"return Number(document.body.dataset.{name} || 0)"))


def wait_until(driver, condition):
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.execute_script(f"return {condition}"))


def test_say_what_it_is_watch_the_gradients_teach_it_and_reset(page, tmp_path):
    """A "0" labelled 6: every layer's dL/dy panel and weight gradients appear, captioned with the backward
    formula; five steps with the true label raise its probability; Reset brings back the trained model's
    probabilities bit for bit."""
    driver, model = page
    clear_with_keyboard(driver)
    before = updates(driver)
    draw(driver, ZERO, "mouse")
    assert wait_for_answer(driver, before) == "0"
    trained = shown(driver, "predict")

    gradients = counter(driver, "gradients")
    driver.find_element(By.CSS_SELECTOR, '#labels button[data-label="6"]').click()
    wait_until(driver, f"Number(document.body.dataset.gradients) > {gradients} && document.body.dataset.busy === 'false'")
    assert driver.find_element(By.CSS_SELECTOR, '#labels [aria-checked="true"]').text == "6"
    assert "for label 6" in driver.find_element(By.ID, "loss").text
    assert " ".join(model["backprop"]["loss_formula"].split()) == driver.find_element(By.ID, "loss-formula").text
    for layer, backward in zip(model["layers"], model["backprop"]["layers"]):
        panel = driver.find_element(By.CSS_SELECTOR, f'figure.layer[data-name="{layer["name"]}"]')
        assert backward["backward_formula"] in panel.find_element(By.CSS_SELECTOR, ".backward-caption").text
        maps = panel.find_elements(By.CSS_SELECTOR, ".gradient canvas")
        assert len(maps) == (layer["shape"][-1] if len(layer["shape"]) == 3 else 1), layer["name"]
        assert len(panel.find_elements(By.CSS_SELECTOR, ".weights li")) == len(backward["variables"])
    coloured = driver.execute_script("""
        const tinted = c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 2]) return true; return false; };
        return [tinted(document.getElementById('saliency')),
                ...[...document.querySelectorAll('figure.layer')].map(p => [...p.querySelectorAll('.gradient canvas')].some(tinted))];
    """)
    assert all(coloured), coloured   # red or blue somewhere in dL/dx and in every layer's dL/dy
    assert save_screenshot(driver, "serve-backprop.png", tmp_path)[:8] == b"\x89PNG\r\n\x1a\n"

    true_label = driver.find_element(By.CSS_SELECTOR, '#labels button[data-label="0"]')
    gradients = counter(driver, "gradients")
    true_label.click()
    wait_until(driver, f"Number(document.body.dataset.gradients) > {gradients} && document.body.dataset.busy === 'false'")
    taught, before = counter(driver, "taught"), updates(driver)
    driver.find_element(By.ID, "teach5").click()
    wait_until(driver, f"Number(document.body.dataset.taught) > {taught} && Number(document.body.dataset.updates) > "
                       f"{before} && document.body.dataset.busy === 'false'")
    assert shown(driver, "before") == trained
    assert shown(driver, "after")[0] > trained[0] and shown(driver, "predict") == shown(driver, "after")
    assert "5 steps with label 0" in driver.find_element(By.ID, "teach-status").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#changes li")) == sum(
        len(layer["variables"]) for layer in model["backprop"]["layers"])

    resets, before = counter(driver, "resets"), updates(driver)
    driver.find_element(By.ID, "reset").click()
    wait_until(driver, f"Number(document.body.dataset.resets) > {resets} && Number(document.body.dataset.updates) > "
                       f"{before} && document.body.dataset.busy === 'false'")
    assert shown(driver, "predict") == trained
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_accessibility_basics(page):
    driver, _ = page
    report = driver.execute_script("""
        const name = el => (el.getAttribute('aria-label') || '').trim()
          || (el.getAttribute('aria-labelledby') || '').split(' ').map(id => document.getElementById(id))
               .filter(Boolean).map(e => e.textContent.trim()).join(' ')
          || [...(el.labels || [])].map(l => l.textContent.trim()).join(' ')
          || (el.tagName !== 'INPUT' ? el.textContent.trim() : '')
          || (el.getAttribute('alt') || '').trim();
        const controls = [...document.querySelectorAll('button, input, select, textarea, a[href]')];
        const pictures = [...document.querySelectorAll('img, canvas, [role=img]')];
        return {
          lang: document.documentElement.lang,
          title: document.title,
          h1: document.querySelectorAll('h1').length,
          unnamedControls: controls.filter(el => !name(el)).map(el => el.outerHTML.slice(0, 80)),
          unnamedPictures: pictures.filter(el => !name(el)).map(el => el.outerHTML.slice(0, 80)),
          clearIsButton: document.getElementById('clear').tagName === 'BUTTON'
                         && document.getElementById('clear').tabIndex === 0,
          uploadLabel: name(document.getElementById('upload')),
          live: document.getElementById('status').getAttribute('aria-live'),
          viewport: document.querySelector('meta[name=viewport]').content,
        };
    """)
    assert report["lang"] == "en" and report["title"] and report["h1"] == 1
    assert report["unnamedControls"] == [] and report["unnamedPictures"] == []
    assert report["clearIsButton"] and report["uploadLabel"] == "Upload a photo…"
    assert report["live"] == "polite" and "width=device-width" in report["viewport"]


def test_phone_width(page, tmp_path):
    driver, model = page
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        before = updates(driver)
        clear_with_keyboard(driver)
        draw(driver, ONE, "touch")
        assert wait_for_answer(driver, before) == "1"
        layout = driver.execute_script("""
            const pad = document.getElementById('pad').getBoundingClientRect();
            return {scrollWidth: document.documentElement.scrollWidth, padLeft: pad.left, padRight: pad.right,
                    widest: Math.max(...[...document.querySelectorAll('main *')]
                                        .map(e => e.getBoundingClientRect().right))};
        """)
        assert layout["scrollWidth"] <= 390 and layout["widest"] <= 390
        assert layout["padLeft"] >= 0 and layout["padRight"] <= 390
        save_screenshot(driver, "serve-phone.png", tmp_path)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
