"""A real headless Chromium (Debian's /usr/bin/chromium) driving a real daphne and qcluster.

Playwright's browser download is never used: the tests launch the system Chromium by path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO, missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
ARTIFACTS = REPO / "tests" / "artifacts"

# Quick heartbeats, queue polls and progress events so a page shows every state within seconds.
FAST_WORKER = dict(
    JOBSITE_HEARTBEAT_S=0.3, JOBSITE_QUEUE_POLL_S=0.1, JOBSITE_PROGRESS_EVERY_S=0.1, JOBSITE_WATCHDOG_EVERY_S=1,
)
FAST_WEB = dict(JOBSITE_EVENT_POLL_S=0.1)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        missing(f"needs Debian's Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread, which makes Django's
    # ORM refuse to work from the test ("async context"); the test itself is synchronous code.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


class Site:
    """One test's daphne + worker and the browser pages logged in to it."""

    def __init__(self, browser, start_daphne, start_worker):
        self.browser = browser
        self._start_daphne = start_daphne
        self._start_worker = start_worker
        self.web_env: dict = {}
        self.daphne = None
        self.port = None
        self.contexts = []
        self.pages = []
        self.services = []
        self.errors: list[str] = []

    # The servers keep Django's async safety check, which this test process turns off.
    def start_worker(self, **env):
        worker = self._start_worker(**{**FAST_WORKER, "DJANGO_ALLOW_ASYNC_UNSAFE": "", **env})
        self.services.append(worker)
        return worker

    def start_web(self, port: int | None = None, **env):
        """Start daphne (again on `port` after a stop, with the same settings as before)."""
        self.web_env = {**FAST_WEB, "DJANGO_ALLOW_ASYNC_UNSAFE": "", **self.web_env, **env}
        self.daphne, self.port = self._start_daphne(port=port, **self.web_env)
        self.services.append(self.daphne)
        return self.daphne

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def page(self, user):
        from django.test import Client

        client = Client()
        client.force_login(user)
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_cookies([{"name": "sessionid", "value": client.cookies["sessionid"].value,
                              "url": f"http://127.0.0.1:{self.port}"}])
        self.contexts.append(context)
        page = context.new_page()
        self.pages.append(page)
        page.set_default_timeout(60_000)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        # htmx reports its own mistakes as console errors: a redraw aborted by the next one, a
        # swap or a target that failed. (A request that fails while the server is down is not one.)
        page.on("console", lambda message: message.type == "error"
                and message.text.startswith(("htmx:sendAbort", "htmx:swapError", "htmx:targetError"))
                and self.errors.append(message.text))
        return page

    def report(self) -> None:
        """What a failing test needs to be understood; pytest shows it only on failure."""
        from extraction.models import Extraction
        from jobsite.models import Event

        for job in Extraction.objects.order_by("pk"):
            print(f"{job}: {job.samples_processed}/{job.total_samples} worker={job.worker!r} error={job.error_message!r}")
        for event in Event.objects.order_by("-seq")[:15][::-1]:
            print(f"event {event.seq} {event.type} {event.topic}")
        for page in self.pages:
            try:
                print("page", page.url, page.evaluate(
                    "window.jobsiteLive && JSON.stringify({...jobsiteLive, socket: undefined})"))
            except Exception as exc:  # noqa: BLE001 - a closed page has nothing to say
                print("page", exc)
        for service in self.services:
            print(f"--- {service.log_path.name}\n{service.output()[-4000:]}")

    def close(self):
        for page in self.pages:
            # A page on a held clock (page.clock.install) leaves its socket open through the
            # context's close: daphne then waits its 5 s for the consumer before it stops.
            try:
                page.evaluate("window.jobsiteLive && jobsiteLive.socket && jobsiteLive.socket.close()")
            except Exception:  # noqa: BLE001 - a page already closed has no socket left
                pass
        for context in self.contexts:
            context.close()


@pytest.fixture
def site(browser, start_daphne, start_worker):
    made = Site(browser, start_daphne, start_worker)
    yield made
    made.report()
    made.close()
    assert not made.errors, f"JavaScript errors on the page: {made.errors}"


def settled(page, events: int) -> None:
    """A page starts its stream before the last seconds' events (one may have committed after the
    page read its rows): waits until the `events` replayed have redrawn what they redraw."""
    page.wait_for_function("(n) => jobsiteLive.events >= n", arg=events)
    page.wait_for_timeout(600)  # the redraws of the region and the history wait 250 and 400 ms
    page.wait_for_function("() => !document.querySelector('.htmx-request')")


def page_on_held_clock(site, user, path: str):
    """A page at `path` whose clock then moves only when the test moves it (page.clock.run_for)."""
    page = site.page(user)
    page.clock.install()
    page.goto(site.url(path))
    page.clock.pause_at(page.evaluate("Date.now()") / 1000 + 1)  # a number is seconds here
    return page


def run_clock_until(page, condition: str, step_ms: int = 25, limit_s: float = 30) -> None:
    """Moves a held page clock on in small steps until `condition` (a JS expression) holds: the
    page's redraws wait on its timers (a debounce, htmx's settle, a redraw queued behind another)."""
    for _ in range(int(limit_s * 1000 / step_ms)):
        if page.evaluate(f"() => Boolean({condition})"):
            return
        page.clock.run_for(step_ms)
        page.wait_for_timeout(step_ms)  # the test's own time: the server's answer travels meanwhile
    raise AssertionError(f"the page never came to {condition}")


def deliver(page, seq: int, topic: str, type_: str, payload: dict) -> None:
    """A message as the page's socket delivers it, sent and heartbeating now, in the server's time as the
    page reckons it (the page's clock differs from the server's by however long the page took to load)."""
    at = page.evaluate("new Date(jobsiteLive.serverNow()).toISOString()")
    page.evaluate("(m) => jobsiteLive.receive(m)", {
        "seq": seq, "topic": topic, "type": type_, "created_at": at, "payload": {**payload, "heartbeat_at": at}})


def screenshot(page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
