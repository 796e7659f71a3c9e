"""`gpt-sql serve`'s page in a real browser: Debian's chromium, headless, driven by Selenium through chromedriver.
It loads the page, generates, reads a token's alternatives and opens its inside view from the keyboard.

Skips with the reason when chromium, chromedriver or selenium is missing; under CI=true their absence fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import missing

from test_serve import start, stop

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHAPE = dict(n_embd=32, n_head=2, n_layer=3, n_ctx=128)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver; package {package})"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        missing(reason)
    from selenium import webdriver

    profile = tempfile.mkdtemp(prefix="gpt-sql-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as root in a container with no network: no sandbox, no GPU, nothing that calls home
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1440,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_server(dsn, load_tiny):
    load_tiny("serve_page", **SHAPE)
    s = start(dsn, "--model", "serve_page")
    yield s
    stop(s)


def test_generate_and_look_inside(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 60)
    d.get(page_server.url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    assert d.find_element(By.ID, "model").get_attribute("value") == "serve_page"

    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("The quick brown fox")
    d.find_element(By.ID, "max_tokens").clear()
    d.find_element(By.ID, "max_tokens").send_keys("12")
    d.find_element(By.ID, "seed").send_keys("7")  # a fixed draw: the same tokens whatever ran before
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: "tokens in" in d.find_element(By.ID, "status").text)
    tokens = d.find_elements(By.CSS_SELECTOR, "#output .tok")
    assert 1 <= len(tokens) <= 12
    shades = {t.value_of_css_property("background-color") for t in tokens}
    assert len(shades) > 1 or len(tokens) == 1  # shaded by probability, not all alike

    # hover: the alternatives. A token of white space alone (a newline) may be drawn without width, where no pointer
    # can rest: hover the first one that has some
    shown = next(t for t in tokens if t.size["width"] > 0 and t.text.strip())
    ActionChains(d).move_to_element(shown).perform()
    tip = d.find_element(By.ID, "tooltip")
    wait.until(lambda d: tip.is_displayed())
    assert "%" in tip.text and len(tip.find_elements(By.CSS_SELECTOR, "tr")) == 5  # logprobs 5

    # from the keyboard: focus a token (it is in the tab order), Enter opens the inside view
    k = len(tokens) - 1
    assert tokens[k].get_attribute("tabindex") == "0"
    d.execute_script("arguments[0].focus()", tokens[k])
    tokens[k].send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heatmaps canvas")) == SHAPE["n_layer"])
    assert d.find_element(By.ID, "inspect").is_displayed()
    lens_rows = d.find_elements(By.CSS_SELECTOR, "#lens tr")
    assert len(lens_rows) == 1 + SHAPE["n_layer"]
    assert "inspect variant" in d.find_element(By.ID, "inspect-note").text
    # the heatmaps are drawn: some pixel of a canvas is not white
    drawn = d.execute_script("""
        const c = document.querySelector('#heatmaps canvas'), g = c.getContext('2d');
        const px = g.getImageData(28, 0, c.width - 28, 16).data;
        for (let i = 0; i < px.length; i += 4) if (px[i] < 250) return true;
        return false;""")
    assert drawn
    d.find_element(By.CSS_SELECTOR, "#sql-panel summary").click()
    assert "set_config('gpt.inspect', 'on', true)" in d.find_element(By.ID, "sql-settings").text
    assert "WITH RECURSIVE" in d.find_element(By.ID, "sql-query").text
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"] if hasattr(d, "get_log") else []
    assert not errors, errors


@pytest.mark.skipif(not os.environ.get("GPT_SQL_SCREENSHOT"), reason="set GPT_SQL_SCREENSHOT=docs/serve.png to draw "
                                                                   "the README's picture")
def test_screenshot(browser, dsn, conn):
    """The README's picture: the bundled model (a real tokenizer, readable text) generating, one token opened."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from gpt_sql.loader.checkpoint import read_checkpoint
    from gpt_sql.loader.load import load
    from gpt_sql.runner.firstrun import bundled_path

    if "serve_bundled" not in [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")]:
        load(conn, read_checkpoint(bundled_path()), "serve_bundled", progress=False)
    s = start(dsn, "--model", "serve_bundled")
    try:
        d, wait = browser, WebDriverWait(browser, 120)
        d.get(s.url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        d.find_element(By.ID, "prompt").clear()
        d.find_element(By.ID, "prompt").send_keys("ROMEO:\nBut soft, what light")
        for field, value in (("max_tokens", "24"), ("seed", "3")):
            d.find_element(By.ID, field).clear()
            d.find_element(By.ID, field).send_keys(value)
        d.find_element(By.ID, "generate").click()
        wait.until(lambda d: "tokens in" in d.find_element(By.ID, "status").text)
        tokens = d.find_elements(By.CSS_SELECTOR, "#output .tok")
        tokens[min(9, len(tokens) - 1)].click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heatmaps canvas")) == 6)
        d.find_element(By.CSS_SELECTOR, "#sql-panel summary").click()
        d.execute_script("window.scrollTo(0, 0)")
        d.save_screenshot(os.environ["GPT_SQL_SCREENSHOT"])
    finally:
        stop(s)
