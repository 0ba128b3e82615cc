import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from jobsite import watchdog


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


class Command(BaseCommand):
    help = "Operations on every kind of job: recover (run the watchdog now), cleanup (output of dead jobs)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("recover", help="fail stalled or timed-out jobs now and resend lost enqueues")
        cleanup = sub.add_parser("cleanup", help="list (or --delete) outputs nobody needs; dry run by default")
        cleanup.add_argument("--delete", action="store_true", help="remove what is listed")

    def handle(self, *args, **options):
        getattr(self, f"do_{options['action']}")(options)

    def do_recover(self, options):
        changed = watchdog.run()
        for line in changed:
            self.stdout.write(line)
        if not changed:
            running = sum(m.objects.filter(status__in=m.RUNNING).exclude(worker="").count() for m in watchdog.job_models())
            self.stdout.write(f"Nothing to recover: {running} running job(s), all with a live heartbeat.")

    def candidates(self) -> list[tuple[Path, str]]:
        from extraction.models import Extraction
        from training_runs.models import TrainingRun

        found: list[tuple[Path, str]] = []
        for model, folder in ((Extraction, "activations"), (TrainingRun, "training_runs")):
            root = settings.JOBSITE_DATA_DIR / folder
            if not root.is_dir():
                continue
            status = dict(model.objects.values_list("pk", "status"))
            # A removed job keeps its row as history; its files went after the removal, or should have.
            removed = set(status) - set(model.objects.filter(model.live()).values_list("pk", flat=True))
            for path in sorted(root.iterdir()):
                if not path.is_dir() or not path.name.isdigit():
                    found.append((path, "not a job directory"))
                elif int(path.name) not in status:
                    found.append((path, f"{model.KIND} {path.name} no longer exists"))
                elif int(path.name) in removed:
                    found.append((path, f"{model.KIND} {path.name} was removed"))
                elif status[int(path.name)] in ("failed", "cancelled"):
                    found.append((path, f"{model.KIND} {path.name} is {status[int(path.name)]}"))
                elif not any(path.iterdir()):
                    found.append((path, "empty"))
                else:
                    found += [(tmp, "unfinished temporary file") for tmp in path.rglob("*.tmp*") if tmp.is_file()]
        return found

    def do_cleanup(self, options):
        found = self.candidates()
        total = 0
        for path, reason in found:
            size = _size(path)
            total += size
            self.stdout.write(f"{_human(size):>10}  {path}  ({reason})")
            if options["delete"]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        verb = "Removed" if options["delete"] else "Would remove"
        hint = "" if options["delete"] or not found else " Run again with --delete to remove them."
        self.stdout.write(f"{verb} {len(found)} item(s), {_human(total)}.{hint}")
