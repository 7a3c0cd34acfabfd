"""Headless Chromium for tests that look at pages as a user does."""

from __future__ import annotations

import shutil

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1400,1000")


def chromium_available() -> bool:
    """Debian's chromium and chromium-driver are installed."""
    return bool(shutil.which("chromedriver") and (shutil.which("chromium")))


def chromium_start():
    """A headless Chromium driven by chromedriver; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    return driver
