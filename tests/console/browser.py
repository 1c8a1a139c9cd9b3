"""The web console in a real browser (Debian's Chromium through its chromedriver, driven by Selenium).

    browser.py URL READ_TOKEN SUBMIT_TOKEN ADMIN_TOKEN MODEL OUT_DIR WORKER_ARGV_JSON

URL is a front end (`serve --console --devices none`) on a NATS queue; WORKER_ARGV_JSON the command
line of a worker on the same queue, started here once a job is seen QUEUED. Saves a screenshot of each
page under OUT_DIR and exits non-zero (with the reason) on the first check that fails.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from ddpm_worker_client import Client

URL, READ, SUBMIT, ADMIN, MODEL, OUT, WORKER = sys.argv[1:8]
GRPC = URL.replace("http://", "")
os.makedirs(OUT, exist_ok=True)


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("DDPM_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    service = Service(executable_path=os.environ.get("DDPM_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def wait(driver, condition, what, timeout=30):
    # The pages render again at each event: an element found a moment ago may be gone (stale); look again.
    waiter = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    try:
        return waiter.until(condition)
    except TimeoutException:
        shot(driver, "failed")
        raise AssertionError(f"timed out waiting for {what}; page: {driver.current_url}\n"
                             + driver.find_element(By.TAG_NAME, "body").text[:2000])


def shot(driver, name):
    driver.save_screenshot(os.path.join(OUT, name + ".png"))


def fetch(driver, path, method="GET", header=True):
    """A request from the page, with its cookie: (status, JSON body)."""
    return driver.execute_async_script(
        """
        const [path, method, header, done] = arguments;
        const headers = header ? {"X-DDPM-Console": "1"} : {};
        fetch(path, {method, headers, credentials: "same-origin"})
          .then(async (r) => done([r.status, await r.json().catch(() => null)]))
          .catch((e) => done([0, String(e)]));
        """, path, method, header)


def text(driver, selector):
    """An element's text, read in the page in one step (None when it is not there)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent", selector)


def click(driver, selector):
    """Clicks an element in the page in one step (the page may render it again at any event)."""
    assert driver.execute_script("const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e",
                                 selector), f"nothing to click at {selector}"


def state_of_row(job_id):
    def check(driver):
        return driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e && e.dataset.state",
            f'tr[data-job="{job_id}"] .state')
    return check


def log_in(driver, token, expect_role):
    driver.get(URL + "/console/login")
    field = wait(driver, ec.visibility_of_element_located((By.ID, "token")), "the login form")
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait(driver, ec.text_to_be_present_in_element((By.ID, "whoami"), f"({expect_role})"), f"logged in as {expect_role}")


def main():
    submitter = Client(GRPC, token=SUBMIT)
    driver = browser()
    worker = None
    try:
        # 1. Without a token: the login page, and every data route refuses.
        driver.get(URL + "/console/")
        wait(driver, ec.visibility_of_element_located((By.ID, "login")), "the login form")
        assert "/console/login" in driver.current_url, driver.current_url
        for path in ("/console/api/session", "/console/api/jobs/events", "/console/api/workers"):
            status, body = fetch(driver, path)
            assert status == 401 and body["code"] == "UNAUTHENTICATED", (path, status, body)
        driver.find_element(By.ID, "token").send_keys("not-a-token")
        driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        wait(driver, ec.text_to_be_present_in_element((By.ID, "login-error"), "UNAUTHENTICATED"), "the refusal")
        shot(driver, "login")
        cookies = driver.get_cookies()
        assert not cookies, cookies

        # 2. A reader sees a job go from QUEUED to SUCCEEDED on the jobs page, without a reload.
        log_in(driver, READ, "read")
        [cookie] = driver.get_cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != READ, cookie
        assert READ not in driver.current_url
        first = submitter.submit(MODEL, 16, scheduler="dpmsolver", steps=25, seed=0, batch_size=16,
                                 labels={"console": "first"})
        driver.execute_script("window.__sameDocument = 'yes'")
        wait(driver, lambda d: state_of_row(first.id)(d) == "QUEUED", "the new job, QUEUED")
        shot(driver, "jobs-queued")
        worker = subprocess.Popen(json.loads(WORKER), stdout=subprocess.DEVNULL)
        wait(driver, lambda d: state_of_row(first.id)(d) == "SUCCEEDED", "the job, SUCCEEDED", timeout=180)
        assert driver.execute_script("return window.__sameDocument") == "yes", "the page reloaded"
        shot(driver, "jobs")

        # 3. Its page: the grid decoded by the browser, the links, how its shards ran.
        click(driver, f'a[href="/console/jobs/{first.id}"]')
        wait(driver, lambda d: d.execute_script(
            "const i = document.querySelector('img[data-grid=\"0\"]'); return i && i.complete && i.naturalWidth"),
            "the grid, decoded")
        width = driver.execute_script("return document.querySelector('img[data-grid=\"0\"]').naturalWidth")
        assert width > 0, width
        assert driver.execute_script("return window.__sameDocument") == "yes", "the page reloaded"
        links = dict(driver.execute_script(
            "return [...document.querySelectorAll('#links a')].map((a) => [a.textContent, a.href])"))
        status, manifest = fetch(driver, links["manifest"])
        assert status == 200 and manifest["job_id"] == first.id, (status, manifest)
        assert int(text(driver, "#attempts")) >= 1
        assert not driver.find_elements(By.ID, "cancel"), "a reader is offered cancel"
        shot(driver, "job")

        # 4. A reader may not cancel: no button, and the route refuses.
        second = submitter.submit(MODEL, 256, scheduler="ddpm", steps=1000, seed=1, batch_size=16)
        driver.get(URL + "/console/jobs/" + second.id)
        wait(driver, ec.visibility_of_element_located((By.ID, "job-state")), "the second job's page")
        assert not driver.find_elements(By.ID, "cancel"), "a reader is offered cancel"
        status, body = fetch(driver, f"/console/api/jobs/{second.id}/cancel", "POST")
        assert status == 403 and body["code"] == "PERMISSION_DENIED", (status, body)
        # ... and a request without the console's header is refused whatever the token.
        status, body = fetch(driver, f"/console/api/jobs/{second.id}/cancel", "POST", header=False)
        assert status == 403, (status, body)

        # 5. An admin cancels it from its page and sees it CANCELLED.
        driver.find_element(By.ID, "logout").click()
        wait(driver, ec.visibility_of_element_located((By.ID, "login")), "the login form after logging out")
        assert not driver.get_cookies(), driver.get_cookies()
        log_in(driver, ADMIN, "admin")
        driver.get(URL + "/console/jobs/" + second.id)
        wait(driver, lambda d: text(d, "#job-state") in ("QUEUED", "RUNNING"), "the live job")
        wait(driver, lambda d: text(d, "#cancel"), "the cancel button")
        click(driver, "#cancel")
        wait(driver, lambda d: text(d, "#job-state") == "CANCELLED", "CANCELLED")
        assert submitter.get(second.id).state == "CANCELLED"
        shot(driver, "job-cancelled")

        # 6. Workers and the queue; the jobs page on a phone's screen.
        driver.get(URL + "/console/workers")
        wait(driver, ec.visibility_of_element_located((By.ID, "worker")), "the workers page")
        shot(driver, "workers")
        driver.set_window_size(390, 844)
        driver.get(URL + "/console/?state=SUCCEEDED")
        wait(driver, lambda d: state_of_row(first.id)(d) == "SUCCEEDED", "the filtered list")
        assert not driver.find_elements(By.CSS_SELECTOR, f'tr[data-job="{second.id}"]'), "the filter let a cancelled job through"
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
        shot(driver, "jobs-phone")
        print(json.dumps({"first": first.id, "second": second.id, "grid_width": width}))
    finally:
        driver.quit()
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()


if __name__ == "__main__":
    main()
