"""``ddstrans demo``: the page's functions, a real headless Chromium driving the page, and the Gradio client API.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); where they are
missing it is skipped with the reason. No browser is downloaded at test time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddstrans.demo import DemoInputError, load_uploads, translate_many, translate_one, write_zip
from ddstrans.images import load_image
from ddstrans.translator import Translator

MAX_PIXELS = 5000  # the server's --max-pixels in these tests: a 80x80 upload is "too large"


@pytest.fixture(scope="module")
def translator(shapes_translator_dir):
    return Translator.from_pretrained(shapes_translator_dir)


@pytest.fixture(scope="module")
def shapes_png(shapes_translator_dir, tmp_path_factory):
    """A held-out shapes render, scaled to 48x40 (not square: the page keeps the aspect ratio)."""
    p = tmp_path_factory.mktemp("demo_inputs") / "scene.png"
    Image.open(shapes_translator_dir / "examples" / "example_1.png").resize((48, 40), Image.NEAREST).save(p)
    return p


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ---------------------------------------------------------------------- the page's functions (no server)
def test_translate_one_equals_translator_and_reports_time(translator, shapes_png):
    im = load_image(shapes_png)
    res = translate_one(translator, im, "to_blue")
    assert _same(res.images[0], translator(im, task="to_blue")) and not _same(res.images[0], im)
    status = res.status("cpu (PyTorch)")
    assert "to_blue" in status and "ms / image" in status and "cpu (PyTorch)" in status


class _TextTranslator:
    conditioning, tasks = "text", ["to_blue"]


def test_bad_input_is_a_sentence(translator):
    with pytest.raises(DemoInputError, match="Upload, paste or pick"):
        translate_one(translator, None, "to_blue")
    with pytest.raises(DemoInputError, match="at most 5,000 pixels"):
        translate_one(translator, Image.new("RGB", (80, 80)), "to_blue", max_pixels=MAX_PIXELS)
    with pytest.raises(DemoInputError, match="not an image"):
        translate_one(translator, "hello", "to_blue")
    with pytest.raises(DemoInputError, match="Unknown task"):
        translate_one(translator, Image.new("RGB", (8, 8)), "to_purple")
    with pytest.raises(DemoInputError, match="Choose a task"):
        translate_one(translator, Image.new("RGB", (8, 8)), "custom prompts", "a", "b")
    for source, target in (("", "a blue circle"), ("a red circle", "   "), (None, None)):
        with pytest.raises(DemoInputError, match="Type both a source prompt"):
            translate_many(_TextTranslator(), [Image.new("RGB", (8, 8))], "custom prompts", source, target)


def test_batch_skips_non_images_and_zips_the_rest(translator, shapes_png, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    names, images, skipped = load_uploads([shapes_png, notes, big, shapes_png], max_pixels=MAX_PIXELS)
    assert names == ["scene", "scene"] and len(images) == 2
    assert [s.split(":")[0] for s in skipped] == ["notes.txt", "big.png"] and "100 x 100" in skipped[1]
    res = translate_many(translator, images, "to_red")
    z = write_zip(names, res.images, tmp_path / "out")
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == ["scene.png", "scene_1.png"]
        got = Image.open(BytesIO(zf.read("scene_1.png")))
        assert _same(got, translator(load_image(shapes_png), task="to_red"))


def test_importing_ddstrans_does_not_import_gradio():
    code = "import sys, ddstrans, ddstrans.demo, ddstrans.cli.main; ddstrans.cli.main.build_parser(); " \
           "print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


# ---------------------------------------------------------------------- a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(shapes_translator_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ddstrans.cli.main", "demo", str(shapes_translator_dir),
                                 "--port", str(port), "--device", "cpu", "--max-pixels", str(MAX_PIXELS)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_gradio_client_api(server, translator, shapes_png, tmp_path):
    from gradio_client import Client, handle_file

    url, proc, _ = server
    client = Client(url, verbose=False, download_files=str(tmp_path))
    _slider, out, status = client.predict(handle_file(str(shapes_png)), "to_blue", "", "", "pad", api_name="/translate")
    assert _same(Image.open(out), translator(load_image(shapes_png), task="to_blue"))
    assert "ms / image" in status
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    zpath, _gallery, status = client.predict([handle_file(str(notes)), handle_file(str(shapes_png))], "to_square", "",
                                             "", "resize", api_name="/translate_batch")
    with zipfile.ZipFile(zpath) as zf:
        assert zf.namelist() == ["scene.png"]
        got = Image.open(BytesIO(zf.read("scene.png")))
    assert _same(got, translator(load_image(shapes_png), task="to_square", fit="resize")) and "skipped 1" in status
    with pytest.raises(Exception, match="None of the uploaded files"):
        client.predict([handle_file(str(notes))], "to_blue", "", "", "pad", api_name="/translate_batch")
    assert proc.poll() is None  # still serving


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("browser test: Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser test: selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1100"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"browser test: headless chromium does not start here ({str(e).splitlines()[0]})")


def _wait(fn, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception:  # noqa: BLE001 - the page is still rendering
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_browser_upload_translate_to_blue(server, translator, shapes_png, tmp_path):
    from selenium.webdriver.common.by import By

    url, proc, log = server
    driver = _browser()
    try:
        driver.get(url)
        By_css = By.CSS_SELECTOR
        # too large an image: a message in the page, and the server goes on
        big = tmp_path / "big.png"
        Image.new("RGB", (80, 80), (200, 30, 30)).save(big)
        _wait(lambda: driver.find_element(By_css, "#input-image input[type=file]"), what="the upload field")
        driver.find_element(By_css, "#input-image input[type=file]").send_keys(str(big))
        _wait(lambda: driver.find_element(By_css, "#input-image img"), what="the uploaded image")
        driver.find_element(By_css, "#translate-btn").click()
        toast = _wait(lambda: [e.text for e in driver.find_elements(By_css, ".toast-body") if "5,000" in e.text],
                      what="the too-large message")
        assert "at most 5,000 pixels" in toast[0] and "Traceback" not in driver.page_source
        # a shapes image: the page's output is the translator's output, pixel for pixel
        _wait(lambda: driver.find_element(By_css, "#input-image button[aria-label='Remove Image']"), what="clear").click()
        _wait(lambda: driver.find_element(By_css, "#input-image input[type=file]"), what="the upload field")
        driver.find_element(By_css, "#input-image input[type=file]").send_keys(str(shapes_png))
        _wait(lambda: driver.find_element(By_css, "#input-image img"), what="the uploaded image")
        label = next(e for e in driver.find_elements(By_css, "#task label") if e.text.strip() == "to_blue")
        label.click()
        driver.find_element(By_css, "#translate-btn").click()
        src = _wait(lambda: driver.find_element(By_css, "#output-image img").get_attribute("src"),
                    what="the output image")
        with urllib.request.urlopen(src, timeout=30) as r:
            shown = Image.open(BytesIO(r.read()))
        expected = translator(load_image(shapes_png), task="to_blue")
        assert _same(shown, expected) and not _same(shown, load_image(shapes_png))
        status = _wait(lambda: driver.find_element(By_css, "#status").text, what="the status line")
        assert "to_blue" in status and "ms / image" in status and "cpu" in status
        if os.environ.get("DDSTRANS_DEMO_SCREENSHOT"):
            driver.save_screenshot(os.environ["DDSTRANS_DEMO_SCREENSHOT"])
        assert proc.poll() is None and "Traceback" not in log.read_text()
    finally:
        driver.quit()
