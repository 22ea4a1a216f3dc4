"""The web app in a real browser: uvicorn serves the page on a free port (background thread, the
tiny detector), headless Chromium (Debian's, driven by Playwright) uploads an image, types a
vocabulary, sets the threshold, drags an exemplar box, submits, and reads the picture, the
table, the random-weights banner and the on-page messages for bad input."""
import os
import shutil

import pytest
from tiny_app import VOCAB, one_torch_thread, png_bytes, red_square, serve, tiny_detector

from regionclip_d2.app import create_app


def chromium_path():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.isfile("/usr/bin/chromium") else None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (tools/setup/install.sh installs it): no browser test")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium binary (tools/setup/install.sh installs Debian's chromium with apt-get where it "
                    "can; or apt-get install chromium): no browser test")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    pytest.importorskip("uvicorn")
    folder = tmp_path_factory.mktemp("browser")
    (folder / "red.png").write_bytes(png_bytes(red_square()))
    with one_torch_thread():
        det = tiny_detector(folder)
        app = create_app(lambda: det, samples={"red.png": str(folder / "red.png")}, default_vocabulary="cat",
                         default_threshold=0.3)
        with serve(app) as base:
            yield base


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_threshold(page, value: str):
    page.locator("#threshold").evaluate(
        "(e, v) => { e.value = v; e.dispatchEvent(new Event('input', {bubbles: true})); }", value)


def test_upload_vocabulary_threshold_exemplar_and_results(page, tmp_path):
    assert page.locator("#random-banner").is_visible()
    assert "RANDOM WEIGHTS" in page.locator("#random-banner").inner_text()
    # the sample is shown first; then an upload replaces it
    page.locator("#preview").wait_for(state="visible")
    upload = tmp_path / "photo.png"
    upload.write_bytes(png_bytes(red_square(90, 120, seed=3)))
    page.set_input_files("#image-file", str(upload))
    page.wait_for_function("() => document.getElementById('preview').naturalWidth === 120")
    assert "120 x 90 pixels" in page.locator("#image-size").inner_text()
    assert "(uploaded: photo.png)" in page.locator("#sample option:checked").inner_text()
    page.fill("#vocabulary", ", ".join(VOCAB))
    set_threshold(page, "0")
    assert page.locator("#threshold-value").inner_text() == "0.00"
    # an exemplar box by dragging over the left half of the picture (display pixels -> image pixels)
    box = page.locator("#preview").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4, steps=4)
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.6, steps=4)
    page.mouse.up()
    x0, y0, x1, y1 = (int(v) for v in page.input_value("#exemplar-box").split(","))
    assert abs(x0 - 12) <= 2 and abs(y0 - 18) <= 2 and abs(x1 - 60) <= 2 and abs(y1 - 54) <= 2
    page.fill("#exemplar-name", "my thing")
    page.click("#detect")
    page.locator("#result").wait_for(state="visible")
    rows = page.locator("#detections tbody tr")
    assert rows.count() >= 1
    first = [c.inner_text() for c in rows.first.locator("td").all()]
    assert first[1] in VOCAB + ["my thing"] and 0.0 <= float(first[2]) <= 1.0 and len(first[3].split(",")) == 4
    assert "among 3 class(es) on the 120 x 90 image" in page.locator("#summary").inner_text()
    assert "RANDOM weights" in page.locator("#summary").inner_text()
    page.wait_for_function("() => document.getElementById('result-image').naturalWidth > 0")
    assert page.locator("#result-image").evaluate("e => e.naturalWidth") == 512
    assert page.locator("#message").inner_text() == ""

    # a higher threshold: fewer rows (random weights score far below 0.99)
    set_threshold(page, "0.99")
    page.fill("#exemplar-name", "")
    page.fill("#exemplar-box", "")
    page.click("#detect")
    page.wait_for_function("() => document.getElementById('summary').textContent.includes('>= 0.99')")
    assert page.locator("#detections tbody").inner_text().strip() == "no detection at or above the threshold"


def test_bad_input_shows_a_message_and_the_page_keeps_working(page, tmp_path):
    page.locator("#preview").wait_for(state="visible")
    # an empty vocabulary
    page.fill("#vocabulary", "  ,  ")
    page.click("#detect")
    message = page.locator("#message.error")
    message.wait_for(state="visible")
    assert "the vocabulary is empty: type at least one class name" in message.inner_text()
    assert page.locator("#result").is_hidden()
    # a file that is not an image
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"these are notes, not pixels")
    page.set_input_files("#image-file", str(notes))
    page.fill("#vocabulary", "cat")
    page.click("#detect")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('is not an image')")
    assert "Traceback" not in page.locator("#message").inner_text()
    # a bad exemplar box on the sample
    page.select_option("#sample", "red.png")
    page.fill("#exemplar-name", "thing")
    page.fill("#exemplar-box", "90,60,10,10")
    page.click("#detect")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('x1 <= x0')")
    # then a good request on the same page
    page.fill("#exemplar-box", "")
    page.fill("#exemplar-name", "")
    set_threshold(page, "0")
    page.click("#detect")
    page.locator("#result").wait_for(state="visible")
    assert page.locator("#message").inner_text() == ""
    assert "on the 100 x 70 image" in page.locator("#summary").inner_text()
