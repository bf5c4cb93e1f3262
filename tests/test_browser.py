"""The web page at / in headless Chromium: what it draws must be exactly the API's masks."""

from __future__ import annotations

import os
import shutil

import httpx
import numpy as np
import pytest

from sspsam.masks import decode_rle
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
