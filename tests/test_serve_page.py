"""stn-serve's web page in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve_support import REPO, ServerProcess, digit_png, plain_model
from stn_deploy.images import decode
from stn_deploy.runtime import Session

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (pip install -e '.[dev]')")
pytest.importorskip("uvicorn", reason="stn-serve needs the serve extra")

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a browser in a sandboxless container with no network: no GPU, no background traffic.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = REPO / "benchmarks" / "results" / "serve_page.png"


@pytest.fixture(scope="module")
def warping_model(tmp_path_factory) -> Path:
    """A model whose transformer visibly rotates and zooms (θ ≈ a 24° rotation, 1.15× zoom), so the
    page's warped image differs from its input; exported with theta and warped outputs."""
    from helpers import make_checkpoint
    from stn_deploy.export import export_model

    directory = tmp_path_factory.mktemp("page_model")
    checkpoint = make_checkpoint(directory / "stn_warp.pt", seed=3, theta_bias=(0.8, -0.35, 0.1, 0.35, 0.8, -0.05))
    path = directory / "stn_warp.onnx"
    export_model(checkpoint, path, with_theta=True, with_warped=True, parity_samples=8, progress=False)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, warping_model):
    model = warping_model
    plain = plain_model(model, model.with_name("stn_warp_plain.onnx"))
    proc = ServerProcess(model, plain, "--name", "stn", "--name", "plain")
    yield proc, Session(model, "cpu", threads=1)
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium) to run the page test")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


def test_the_page_classifies_an_uploaded_digit_and_shows_the_warp_and_theta(server, browser, tmp_path):
    proc, session = server
    png = digit_png(tmp_path / "digit.png", 3)
    x = session.preprocessing.normalize(decode(png, session.preprocessing).array[None])
    reference = session.run(x)
    expected = session.class_names[int(reference["log_probs"][0].argmax())]

    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(proc.url + "/")
    page.wait_for_selector("#model option[value='plain']", state="attached")
    page.set_input_files("#file", str(png))
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('warped').naturalWidth > 0")

    assert page.text_content("#label") == expected
    assert page.text_content("#confidence") == f"{100 * np.exp(reference['log_probs'][0].max()):.1f}%"
    assert page.locator("#topk .bar").count() == 5
    assert page.locator("#topk .bar .name").first.text_content() == expected
    assert page.eval_on_selector("#input", "img => img.naturalWidth") == 32
    assert page.eval_on_selector("#warped", "img => img.naturalWidth") == 32
    assert page.is_hidden("#warped-note")
    shown = [
        page.evaluate(f"""() => {{
        const img = document.getElementById('{name}'), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data);
    }}""")
        for name in ("input", "warped")
    ]
    assert shown[0] != shown[1]  # the page shows the transformer's output, not the input twice
    theta = [[float(td) for td in row.locator("td").all_text_contents()] for row in page.locator("#theta tr").all()]
    np.testing.assert_allclose(theta, reference["theta"][0], atol=1e-4)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # The model without a warped output: the page says why instead of showing an image.
    page.select_option("#model", "plain")
    page.wait_for_selector("#warped-note:not([hidden])")
    assert "--with-warped" in page.text_content("#warped-note")
    assert page.is_hidden("#warped-figure")
    assert page.is_visible("#theta-note")
    assert page.text_content("#label") == expected  # same graph, same class

    assert all(url.startswith((proc.url, "data:", "blob:")) for url in requests), requests  # nothing from a CDN
    page.close()


def test_dropping_a_file_on_the_page_classifies_it_and_errors_are_shown(server, browser, tmp_path):
    proc, _ = server
    page = browser.new_page()
    page.goto(proc.url + "/")
    page.wait_for_selector("#model option", state="attached")
    png = base64.b64encode(digit_png(tmp_path / "seven.png", 7).read_bytes()).decode()
    drop = """([data, name]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }"""
    page.evaluate(drop, [png, "seven.png"])
    page.wait_for_selector("#result:not([hidden])")
    assert page.text_content("#status").startswith("seven.png: ")

    page.evaluate(drop, [base64.b64encode(b"not an image").decode(), "junk.png"])
    page.wait_for_selector("#status.error")
    assert "Error 400" in page.text_content("#status") and "not an image" in page.text_content("#status")
    page.close()
