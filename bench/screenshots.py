"""The README's screenshots: one PNG per page, taken from a real daphne and qcluster on a demo database.

    .venv/bin/python bench/screenshots.py                 # writes docs/screenshots/*.png (make screenshots)
    .venv/bin/python bench/screenshots.py --out /tmp/shots --keep

It never touches your own data: it makes a fresh data directory and a SQLite database in it (or
the empty PostgreSQL database named by --database-url), runs `manage.py setup_demo`, starts the
same two processes `make run` starts, seeds jobs through the commands a user runs (a completed
and an out-of-memory extraction, a completed training run, one waiting for review, an extraction
in progress), and drives Debian's Chromium (/usr/bin/chromium) headless with Playwright, at
1,280 × 860 px, as the browser tests do. Takes 3 to 8 minutes on 2 cores, most of it the training run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 860}
# A batch of 64 or more "does not fit in memory" (the failure card shows its suggested retry), and a
# batch of 32 takes a second, so the page catches that extraction in progress.
FAILPOINTS = {"extraction.batch": [
    {"action": "error", "message": "CUDA out of memory. Tried to allocate 2.00 GiB", "min_batch_size": 64},
    {"action": "sleep", "seconds": 1.0, "min_batch_size": 32},
]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    def __init__(self, data_dir: Path, database_url: str):
        self.data_dir = data_dir
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("JOBSITE_") and k not in ("DATABASE_URL", "REDIS_URL")}
        self.env.update(
            DATABASE_URL=database_url, JOBSITE_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1",
            JOBSITE_HEARTBEAT_S="1", JOBSITE_QUEUE_POLL_S="0.2", JOBSITE_PROGRESS_EVERY_S="0.2",
            JOBSITE_FAILPOINTS=json.dumps(FAILPOINTS),
        )
        self.processes: list[subprocess.Popen] = []
        self.port = free_port()

    def manage(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=self.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(f"$ manage.py {' '.join(args)} -> {done.returncode}", flush=True)
        if check and done.returncode != 0:
            raise SystemExit(f"manage.py {' '.join(args)} failed:\n{done.stdout[-3000:]}")
        return done.stdout

    def start(self, *args: str, name: str) -> None:
        log = open(self.data_dir / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(list(args), cwd=REPO, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def start_servers(self) -> None:
        self.start(sys.executable, "manage.py", "qcluster", name="qcluster")
        self.start(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port),
                   "jobsite.asgi:application", name="daphne")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise SystemExit(f"daphne did not listen on {self.port}: see {self.data_dir / 'daphne.log'}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def query(self, code: str) -> str:
        """One value read from the demo database through Django (a `shell -c` print)."""
        return self.manage("shell", "-c", code).strip().splitlines()[-1]


def seed(demo: Demo) -> dict:
    demo.manage("migrate", "--noinput")
    demo.manage("createcachetable")
    demo.manage("setup_demo")
    demo.start_servers()
    demo.manage("extract", "tiny-gpt2", "demo-samples", "--layers", "0,3", "--hooks", "residual,mlp,attention",
                "--batch-size", "16", "--max-samples", "600", "--wait")
    demo.manage("extract", "tiny-gpt2", "demo-samples", "--layers", "1,2", "--hooks", "mlp_hidden",
                "--batch-size", "64", "--wait", check=False)  # fails: out of memory, by the failpoint
    demo.manage("training", "generate", "handbook", "--wait")
    demo.manage("training", "review", "1", "approve")
    demo.manage("training", "train", "1", "--epochs", "4", "--wait")
    return {
        "completed": demo.query("from extraction.models import Extraction as E; "
                                "print(E.objects.filter(status='completed').order_by('pk').first().pk)"),
        "model": demo.query("from extraction.models import ModelRecord as M; print(M.objects.get(name='tiny-gpt2').pk)"),
    }


def shoot(demo: Demo, out: Path, ids: dict) -> list[Path]:
    from playwright.sync_api import sync_playwright

    password = (demo.data_dir / "admin-password.txt").read_text().strip()
    shots: list[Path] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.set_default_timeout(60_000)
        response = page.goto(demo.url("/accounts/login/"))
        if not response or not response.ok:
            raise SystemExit(f"The login page answered {response and response.status}: see "
                             f"{demo.data_dir / 'daphne.log'} (run with --keep to keep it).")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_url("**/extractions/")

        def take(name: str, path: str | None, wait_for: str | None = None, scroll_to: str | None = None) -> None:
            """`path` None: the page as it is now."""
            if path:
                page.goto(demo.url(path))
            if wait_for:
                page.wait_for_selector(wait_for)
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(800)  # live regions settle after their first redraw
            if scroll_to:
                page.locator(scroll_to).first.evaluate(
                    "(el) => window.scrollTo(0, el.getBoundingClientRect().top + window.scrollY - 24)")
                page.wait_for_timeout(300)
            target = out / f"{name}.png"
            page.screenshot(path=str(target))
            shots.append(target)
            print(f"{target.relative_to(REPO) if target.is_relative_to(REPO) else target}  "
                  f"{target.stat().st_size // 1024} KB", flush=True)

        # The admin's navigation sidebar folded, so a changelist gets the page's width.
        page.evaluate("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")

        take("training", "/training/", scroll_to="text=Training run 1: result")
        # A second run waits for review while the first one's result stays in the history.
        demo.manage("training", "generate", "handbook", "--queries-per-chunk", "3", "--wait")
        take("training-review", "/training/")
        pair = demo.query("from training_runs.models import TrainingPair as P; "
                          "print(P.objects.filter(run__pk=2).order_by('pk').first().pk)")
        take("training-pair-edit", f"/training/runs/2/pairs/{pair}/edit/")
        take("extraction-model", f"/extractions/models/{ids['model']}/")
        take("extraction-files", f"/extractions/{ids['completed']}/files/")
        take("admin-extractions", "/admin/extraction/extraction/")
        take("admin-training-runs", "/admin/training_runs/trainingrun/")
        take("api-docs", "/api/v1/docs", wait_for=".swagger-ui .opblock")
        # Last, the extractions page with a job in progress beside the failure, the form set for the demo model.
        demo.manage("extract", "tiny-gpt2", "demo-samples", "--layers", "2", "--hooks", "residual",
                    "--batch-size", "32", "--max-samples", "1200")
        running = demo.query("from extraction.models import Extraction as E; print(E.objects.latest('pk').pk)")
        page.goto(demo.url("/extractions/"))
        page.select_option("select[name=model]", label="tiny-gpt2")
        page.wait_for_function(
            "(card) => { const done = document.querySelector(`${card} [data-field=samples_processed]`);"
            " const rate = document.querySelector(`${card} [data-rate]`);"
            " return done && parseInt(done.textContent.replace(/,/g, '')) >= 300 && rate && /[0-9]/.test(rate.textContent); }",
            arg=f"#extraction-{running}", timeout=180_000)
        take("extractions", None)
        browser.close()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    parser.add_argument("--database-url", default="", help="an empty database to seed (default: SQLite in the "
                        "fresh data directory)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and the servers' logs")
    args = parser.parse_args()
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"Needs Debian's Chromium at {CHROMIUM} (apt-get install -y chromium).")
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="jobsite-screenshots-"))
    demo = Demo(data_dir, args.database_url or f"sqlite:///{data_dir / 'jobsite.sqlite3'}")
    try:
        shoot(demo, args.out.resolve(), seed(demo))
    finally:
        demo.stop()
        if args.keep:
            print(f"data and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
