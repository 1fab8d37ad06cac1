"""The report opened in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) via selenium.

Selenium talks to the system's chromedriver given by path, so Selenium Manager never runs
and nothing is downloaded. A page passes when its title is right, every <img> decoded
(complete with a non-zero natural width) and the browser logged no SEVERE console entry.
The negative tests prove each of those checks can fail. ``ERS_REPORT_SCREENSHOT=docs/report.png``
also saves the demo report's screenshot there (how the README's picture is made).
"""

from __future__ import annotations

import base64
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from report_lake import demo_copy_with_eval, sample_content

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER_CANDIDATES = ("chromedriver",)
SCREENSHOT_ENV = "ERS_REPORT_SCREENSHOT"
WINDOW_WIDTH = 1200


def _find(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@dataclass(frozen=True)
class PageCheck:
    """What the browser saw: the title, each image's (source start, complete, naturalWidth), SEVERE console lines."""

    title: str
    images: list[tuple[str, bool, int]]
    console_errors: list[str]


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium driven through the system chromedriver; skips with the reason when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _find(CHROMIUM_CANDIDATES), _find(CHROMEDRIVER_CANDIDATES)
    if browser is None or driver_path is None:
        pytest.skip(f"Chromium ({browser or 'not found'}) and chromedriver ({driver_path or 'not found'}) are needed: "
                    "apt-get install -y chromium chromium-driver (.ci/run does this)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW_WIDTH},900", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path, screenshot: Path | None = None) -> PageCheck:
    """Load a local page, wait for it to finish, read back what rendered, and take a full-page screenshot."""
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(page.resolve().as_uri())
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "if (document.readyState === 'complete') { done(); } else { window.addEventListener('load', () => done()); }"
    )
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 40), i.complete, i.naturalWidth]);"
    )
    check = PageCheck(
        title=driver.title,
        images=[(src, bool(complete), int(width)) for src, complete, width in images],
        console_errors=[e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
    )
    if screenshot is not None:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return check


def assert_rendered(check: PageCheck, title: str, min_images: int) -> None:
    assert check.title == title, f"title {check.title!r}, expected {title!r}"
    assert len(check.images) >= min_images, f"{len(check.images)} images on the page, expected at least {min_images}"
    broken = [img for img in check.images if not img[1] or img[2] <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert not check.console_errors, f"console errors: {check.console_errors}"


@pytest.mark.spark
def test_demo_report_renders_in_chromium(spark, demo_lake, chromium, tmp_path) -> None:
    """The demo's report: title, histogram, map and every thumbnail decoded, nothing logged; screenshot taken."""
    from ers_spark.stages.report import run_report

    cfg, _ = demo_lake
    cfg = cfg.with_overrides([f"report.path={tmp_path / 'report.html'}"])
    record = run_report(spark, cfg)
    shot = tmp_path / "report.png"
    check = open_page(chromium, Path(record["path"]), screenshot=shot)
    assert_rendered(check, cfg.report.title, min_images=2 + record["counts"]["thumbnails"])
    assert shot.stat().st_size > 50_000  # a page of pictures, not a blank one
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])


@pytest.mark.spark
def test_evaluate_sections_render_in_chromium(spark, demo_lake, chromium, tmp_path) -> None:
    """The demo's tables plus evaluate's: the DET and EDC figures load too."""
    from ers_spark.stages.report import run_report

    cfg = demo_copy_with_eval(spark, demo_lake[0], tmp_path).with_overrides([f"report.path={tmp_path / 'eval.html'}"])
    record = run_report(spark, cfg)
    check = open_page(chromium, Path(record["path"]))
    assert_rendered(check, cfg.report.title, min_images=4 + record["counts"]["thumbnails"])


@pytest.fixture(scope="module")
def good_page(tmp_path_factory) -> str:
    from ers_spark.report.render import render_html

    return render_html(sample_content(with_evaluation=True), thumbnail_px=48, thumbnails_per_band=3)


def test_the_check_passes_a_good_page(chromium, good_page, tmp_path) -> None:
    page = tmp_path / "good.html"
    page.write_text(good_page)
    assert_rendered(open_page(chromium, page), "ers-spark report", min_images=5)


@pytest.mark.parametrize(
    ("injected", "complaint"),
    [
        ('<img alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAA">', "images that did not load"),
        ('<img alt="missing" src="no-such-file.png">', "images that did not load"),
        ('<script>console.error("report script failed")</script>', "console errors"),
        ("<script>undefinedFunction()</script>", "console errors"),
    ],
    ids=["broken-data-uri", "missing-file", "console-error", "uncaught-exception"],
)
def test_the_check_fails_a_broken_page(chromium, good_page, tmp_path, injected, complaint) -> None:
    """A broken image or an error in the console fails the check (so a passing report cannot pass by accident)."""
    page = tmp_path / "broken.html"
    page.write_text(good_page.replace("</body>", f"{injected}\n</body>"))
    with pytest.raises(AssertionError, match=complaint):
        assert_rendered(open_page(chromium, page), "ers-spark report", min_images=5)


def test_the_check_fails_a_wrong_title(chromium, good_page, tmp_path) -> None:
    page = tmp_path / "title.html"
    page.write_text(good_page.replace("<title>ers-spark report</title>", "<title>something else</title>"))
    with pytest.raises(AssertionError, match="title"):
        assert_rendered(open_page(chromium, page), "ers-spark report", min_images=5)
