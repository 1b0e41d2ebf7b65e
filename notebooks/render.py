"""A lesson as a learner sees it: executed in a Jupyter kernel, rendered to HTML by nbconvert, photographed by
headless Chromium.

    python notebooks/render.py                          # 04_convolutions, small setting -> docs/notebook.png
    python notebooks/render.py 04_convolutions --full --out=/tmp/conv.png --html=/tmp/conv.html

MNIST is found as the notebooks find it ($TF_BY_HAND_DATA_DIR, else ../shared/mnist beside the repository, else
the download cache). The formulas are typeset by MathJax 2 when it is on this machine (offline, the page shows
their TeX):
    npm install --prefix ~/.cache/tf-by-hand/mathjax mathjax@2
Needs nbclient, nbconvert, ipykernel, selenium (requirements.txt) and Chromium with its driver
(apt-get install chromium chromium-driver). Exit codes: 0 done, 1 the notebook or the browser failed, 2 bad
arguments.
"""
import argparse
import base64
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
MATHJAX = Path.home() / ".cache" / "tf-by-hand" / "mathjax" / "node_modules" / "mathjax" / "MathJax.js"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--allow-file-access-from-files", "--hide-scrollbars"]
WAIT_SECONDS = 60


class RenderError(RuntimeError):
    """The notebook or the browser failed; the message is one line."""


def notebook_path(name):
    """notebooks/<name>.ipynb for a name such as 05_batch_norm or 05 (its number); ValueError if none."""
    found = [path for path in sorted(NOTEBOOKS.glob("*.ipynb")) if path.stem == name or path.stem[:2] == name]
    if not found:
        choices = ", ".join(path.stem for path in sorted(NOTEBOOKS.glob("*.ipynb")))
        raise ValueError(f"no notebook {name!r}; choose one of: {choices}")
    return found[0]


def execute(path, quick=True, timeout=600):
    """The notebook run top to bottom in a fresh kernel (its small setting unless quick=False)."""
    import nbclient
    import nbformat
    shared = REPO.parent / "shared" / "mnist"
    if not os.environ.get("TF_BY_HAND_DATA_DIR") and shared.is_dir():
        os.environ["TF_BY_HAND_DATA_DIR"] = str(shared)
    os.environ["TF_BY_HAND_QUICK"] = "1" if quick else "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(path, as_version=4)
    try:
        nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    except nbclient.exceptions.CellExecutionError as error:
        raise RenderError(f"{path.name} failed: {str(error).strip().splitlines()[-1]}") from None
    return notebook


def to_html(notebook, mathjax=MATHJAX):
    """nbconvert's HTML of an executed notebook (JupyterLab's look), its formulas typeset by a local MathJax 2."""
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(template_name="lab")
    if Path(mathjax).is_file():
        exporter.mathjax_url = Path(mathjax).as_uri() + "?config=TeX-AMS_CHTML-full,Safe"
    html, _ = exporter.from_notebook_node(notebook)
    return html


def screenshot(html_path, width=1100):
    """The PNG bytes of the whole page at `html_path`, once its pictures are loaded and MathJax (if any) is done."""
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise RenderError("needs Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},1000")
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(WAIT_SECONDS)
        driver.get(Path(html_path).resolve().as_uri())
        WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.execute_script(
            "return Array.from(document.images).every(image => image.complete) && (!window.MathJax ||"
            " (MathJax.Hub && MathJax.Hub.queue.pending === 0 && MathJax.Hub.queue.running === 0))"))
        time.sleep(0.5)   # MathJax's last layout pass
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    finally:
        driver.quit()
    return base64.b64decode(shot["data"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", nargs="?", default="04_convolutions", help="its name or number")
    parser.add_argument("--out", default=str(REPO / "docs" / "notebook.png"), help="the screenshot")
    parser.add_argument("--html", help="also keep the rendered HTML here")
    parser.add_argument("--full", action="store_true", help="the codelab's full training, not the small setting")
    parser.add_argument("--width", type=int, default=1100, help="the browser window's width in pixels")
    args = parser.parse_args(argv)
    try:
        path = notebook_path(args.notebook)
    except ValueError as error:
        parser.exit(2, f"render.py: {error}\n")
    try:
        html = to_html(execute(path, quick=not args.full))
        with tempfile.TemporaryDirectory() as folder:
            html_path = Path(args.html or Path(folder) / f"{path.stem}.html")
            html_path.write_text(html, encoding="utf-8")
            png = screenshot(html_path, args.width)
    except RenderError as error:
        print(f"render.py: {error}", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(png)
    typeset = "formulas typeset" if MATHJAX.is_file() else "formulas as TeX (no local MathJax, see --help)"
    print(f"{path.name}: {Path(args.out)} ({len(png):,} bytes; {typeset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
