"""The web page at / in headless Chromium: what it draws must be exactly the API's masks."""

from __future__ import annotations

import base64
import io
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from sspsam.io.masks import decode_rle, encode_rle
from sspsam.serve import create_app
from test_serve import PHRASES, make_ovss, running_server, scene_png

CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason=f"headless browser test needs chromium and chromedriver (found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER})",
)

# every drawn pixel of the overlay canvas as '0'/'1' (alpha > 0), row-major
READ_OVERLAY = """
const c = document.getElementById('overlay');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const bits = new Array(c.width * c.height);
for (let i = 0; i < bits.length; i++) bits[i] = d[4 * i + 3] ? '1' : '0';
return [c.height, c.width, bits.join('')];
"""


@pytest.fixture(scope="module")
def site():
    app = create_app(model="shapes-demo", ovss=make_ovss(), timeout_s=60)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield url, client


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _bits(mask: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in mask.ravel())


def _submit(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.execute_script("document.body.dataset.state = 'idle'")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    status = driver.find_element(By.ID, "status").text
    assert driver.execute_script("return document.body.dataset.state") == "done", status


def _scene_and_a_found_phrase(client, tmp_path):
    """The demo scene saved for upload, the first phrase the API finds in it, and that mask."""
    rgb, png = scene_png(5)
    path = tmp_path / "scene.png"
    path.write_bytes(png)
    phrase = next(p for p, m in zip(PHRASES, _api_masks(client, png, PHRASES)) if m.any())
    (want,) = _api_masks(client, png, [phrase])
    return rgb, png, path, phrase, want


def _api_masks(client, png: bytes, phrases: list[str]) -> list[np.ndarray]:
    r = client.post("/v1/segment", files={"image": ("scene.png", png, "image/png")}, data={"phrases": phrases})
    assert r.status_code == 200, r.text
    return [decode_rle(x["rle"]) for x in r.json()["results"]]


def test_page_draws_exactly_the_api_masks(site, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, client = site
    rgb, png = scene_png(5)
    path = tmp_path / "scene.png"
    path.write_bytes(png)
    found = [(p, m) for p, m in zip(PHRASES, _api_masks(client, png, PHRASES)) if m.any()]
    assert len(found) >= 2, "the demo model should find at least two of the phrases in its own scene"
    (p1, m1), (p2, m2) = found[:2]

    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "filename").text)

    _submit(browser, p1)  # one phrase
    h, w, drawn = browser.execute_script(READ_OVERLAY)
    (want,) = _api_masks(client, png, [p1])
    assert (h, w) == rgb.shape[:2]
    assert drawn == _bits(want) and "1" in drawn
    # the boxes layer (above the masks) draws one box per instance the API reports
    r = client.post("/v1/segment", files={"image": ("scene.png", png, "image/png")}, data={"phrases": [p1]})
    n_instances = len(r.json()["results"][0]["instances"])
    assert n_instances >= 1 and browser.find_element(By.ID, "boxes").get_attribute("data-boxes") == str(n_instances)

    _submit(browser, f"{p1}; {p2}")  # two phrases, then hide the first
    h, w, drawn = browser.execute_script(READ_OVERLAY)
    assert drawn == _bits(m1 | m2)
    browser.find_element(By.CSS_SELECTOR, "#legend input[data-index='0']").click()
    assert browser.execute_script(READ_OVERLAY)[2] == _bits(m2)
    assert browser.execute_script("return window.__lastResult.texts") == [p1, p2]

    # hovering a pixel of the visible mask names its phrase and score
    ys, xs = np.nonzero(m2)
    k = len(ys) // 2
    canvas = browser.find_element(By.ID, "overlay")
    size = canvas.size  # CSS pixels: the canvas may be scaled to fit
    ox = (xs[k] + 0.5) * size["width"] / w - size["width"] / 2
    oy = (ys[k] + 0.5) * size["height"] / h - size["height"] / 2
    ActionChains(browser).move_to_element_with_offset(canvas, int(ox), int(oy)).perform()
    tip = browser.find_element(By.ID, "tip")
    WebDriverWait(browser, 5).until(lambda d: tip.is_displayed())
    assert p2 in tip.text and "score" in tip.text


def test_page_class_mode_decodes_every_class_mask(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, client = site
    _, png = scene_png(7)
    path = tmp_path / "scene.png"
    path.write_bytes(png)
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "filename").text)
    browser.find_element(By.CSS_SELECTOR, "input[name='mode'][value='ovss']").click()
    _submit(browser, "circle, square, triangle, background")
    decoded = browser.execute_script(
        "return window.__lastResult.masks.map(m => [m.label, Array.from(m.data).join('')])")
    r = client.post("/v1/ovss", files={"image": ("scene.png", png, "image/png")},
                    data={"classes": "circle, square, triangle, background"})
    want = [(m["class"], _bits(decode_rle(m["rle"]))) for m in r.json()["masks"]]
    assert [tuple(d) for d in decoded] == want and want
    union = np.zeros_like(decode_rle(r.json()["masks"][0]["rle"]))
    for m in r.json()["masks"]:
        union |= decode_rle(m["rle"])
    assert browser.execute_script(READ_OVERLAY)[2] == _bits(union)
    # "Download label PNG" hands over the server's palette label PNG (class index per pixel)
    saved = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        URL.createObjectURL = (blob) => { blob.arrayBuffer().then((b) => done(Array.from(new Uint8Array(b)))); return 'blob:x'; };
        document.getElementById('dl-mask').click();""")
    img = Image.open(io.BytesIO(bytes(saved)))
    want_labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["label_png"]))))
    assert img.mode == "P" and np.array_equal(np.asarray(img), want_labels)


def _tab_to(driver, element_id: str, limit: int = 12) -> int:
    """Press Tab until ``element_id`` has the focus; the number of presses (fails if never)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for n in range(1, limit + 1):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        if driver.execute_script("return document.activeElement.id") == element_id:
            return n
    raise AssertionError(f"Tab never reached #{element_id}")


def _keys(driver, *keys) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def _mark_sent(driver) -> None:
    driver.execute_script("document.body.dataset.state = 'sent'")


def _wait_state(driver) -> str:
    """The state the page settles in after a request (the caller marked it 'sent' before sending)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    return driver.execute_script("return document.body.dataset.state")


def test_keyboard_only_upload_result_error_and_recovery(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, client = site
    rgb, png, path, phrase, want = _scene_and_a_found_phrase(client, tmp_path)

    browser.get(url + "/")
    # the page suggests what the loaded model knows, as /v1/models lists it
    examples = client.get("/v1/models").json()["segment"]["examples"]
    assert examples
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button"))
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#examples button")] == examples
    # every input has a name a screen reader reads out
    for el in ("drop", "file", "text"):
        name = browser.execute_script(
            "const e = document.getElementById(arguments[0]);"
            "return (e.labels && e.labels.length ? e.labels[0].textContent : '') + (e.getAttribute('aria-label') || '')"
            " + (e.getAttribute('aria-describedby') || '')", el)
        assert name.strip(), el

    # the drop zone: reached with Tab, Enter and Space each open the file dialog (a spy counts the input's clicks)
    browser.execute_script("window.__picks = 0; document.getElementById('file').addEventListener('click',"
                           " (e) => { window.__picks++; e.preventDefault(); });")
    _tab_to(browser, "drop")
    _keys(browser, Keys.ENTER)
    _keys(browser, Keys.SPACE)
    assert browser.execute_script("return window.__picks") == 2
    browser.find_element(By.ID, "file").send_keys(str(path))  # what the dialog would hand over
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "filename").text)

    # type a phrase and press Enter
    _tab_to(browser, "text")
    _mark_sent(browser)
    _keys(browser, phrase, Keys.ENTER)
    assert _wait_state(browser) == "done"
    h, w, drawn = browser.execute_script(READ_OVERLAY)
    assert drawn == _bits(want) and "1" in drawn
    assert browser.find_element(By.ID, "status").text == "1 of 1 phrases found."
    # a 160×120 scene is scaled up to the view, with crisp pixels
    css_w = browser.execute_script("return document.getElementById('image').getBoundingClientRect().width")
    assert css_w >= 2 * w and "pixelated" in browser.find_element(By.ID, "stage").get_attribute("class")

    # an empty phrase: the server's error is shown and the previous mask is gone
    assert browser.execute_script("return document.activeElement.id") == "text"
    _keys(browser, Keys.END, *[Keys.BACK_SPACE] * len(phrase))
    assert browser.find_element(By.ID, "text").get_attribute("value") == ""
    _mark_sent(browser)
    _keys(browser, Keys.ENTER)
    assert _wait_state(browser) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "422" in error.text and "phrase" in error.text.lower()
    assert "1" not in browser.execute_script(READ_OVERLAY)[2]
    assert not browser.find_elements(By.CSS_SELECTOR, "#legend > li")
    assert browser.execute_script("return window.__lastResult") is None
    assert browser.find_element(By.ID, "dl-mask").get_attribute("disabled")

    # a valid request clears the error
    _mark_sent(browser)
    _keys(browser, phrase, Keys.ENTER)
    assert _wait_state(browser) == "done"
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.execute_script(READ_OVERLAY)[2] == _bits(want)


def test_warnings_shown_and_a_new_upload_clears_everything(site, browser, tmp_path):
    """The response's "warnings" are shown prominently; choosing another file (here one the browser
    cannot show) clears the image, the masks and the warnings at once, and its error replaces them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, client = site
    rgb, png, path, phrase, want = _scene_and_a_found_phrase(client, tmp_path)
    browser.get(url + "/")
    # the server adds "warnings" for images far from a demo model's domain; this wrapper makes every
    # answer carry one, and adds a result flagged as found whose mask is empty: the page must not
    # count or draw it as found
    empty = encode_rle(np.zeros(rgb.shape[:2], bool))
    browser.execute_script("""
        const empty = arguments[0];
        const real = window.fetch;
        window.fetch = async (...args) => {
          const resp = await real(...args);
          if (!String(args[0]).startsWith('/v1/segment') || !resp.ok) return resp;
          const body = await resp.json();
          body.warnings = [...(body.warnings || []), 'this model only knows generated shape scenes'];
          body.results.push({ phrase: 'the hollow one', score: 0.9, no_target: false, area: 0, rle: empty });
          return new Response(JSON.stringify(body), { status: 200, headers: { 'Content-Type': 'application/json' } });
        };""", empty)
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "filename").text)
    _submit(browser, phrase)
    warnings = browser.find_element(By.ID, "warnings")
    assert warnings.is_displayed() and "only knows generated shape scenes" in warnings.text
    assert browser.execute_script(READ_OVERLAY)[2] == _bits(want)
    assert browser.find_element(By.ID, "status").text == "1 of 2 phrases found."
    row = browser.find_elements(By.CSS_SELECTOR, "#legend > li")[1]
    assert "no match" in row.text and row.find_element(By.TAG_NAME, "input").get_attribute("disabled")

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 10).until(lambda d: "notes.txt" in d.find_element(By.ID, "filename").text)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "no-preview").is_displayed())
    assert not warnings.is_displayed() and not browser.find_elements(By.CSS_SELECTOR, "#legend > li")
    assert browser.execute_script("return [document.getElementById('image').width, window.__lastResult]") == [0, None]
    _mark_sent(browser)
    browser.find_element(By.ID, "run").click()
    assert _wait_state(browser) == "error"
    assert "400" in browser.find_element(By.ID, "error").text
