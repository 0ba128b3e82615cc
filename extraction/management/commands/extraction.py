import argparse
import json

from django.core.management.base import BaseCommand, CommandError

from extraction import selectors, services
from extraction.management.commands.extract import follow, positive
from extraction.constants import VALID_BATCH_SIZES
from extraction.models import Extraction
from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionError


def max_samples(value: str) -> int | str:
    if value.strip().lower() == services.ALL_SAMPLES:
        return services.ALL_SAMPLES
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of samples or 'all', not {value!r}") from None


class Command(BaseCommand):
    help = "List, cancel or retry extractions."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="extractions, newest first")
        listing.add_argument("--status", choices=Extraction.Status.values)
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        listing.add_argument("--limit", type=positive, default=50, help="at most this many (default 50)")
        cancel = sub.add_parser("cancel", help="cancel a queued or running extraction")
        cancel.add_argument("extraction_id", type=int)
        retry = sub.add_parser("retry", help="retry a failed or cancelled extraction as a new linked job")
        retry.add_argument("extraction_id", type=int)
        retry.add_argument("--batch-size", type=int, choices=VALID_BATCH_SIZES)
        retry.add_argument("--max-samples", type=max_samples, metavar="N|all",
                           help="a number of samples, or 'all' for the whole dataset (default: the original's)")
        retry.add_argument("--max-length", type=int)
        retry.add_argument("--suggested", action="store_true",
                           help="use the parameters the failure suggested; --batch-size, --max-samples or "
                                "--max-length given as well override the suggestion")
        retry.add_argument("--wait", action="store_true")

    def handle(self, *args, **options):
        try:
            getattr(self, f"do_{options['action']}")(options)
        except (TransitionError, JobInputError) as exc:
            raise CommandError(str(exc))

    def _get(self, extraction_id: int) -> Extraction:
        extraction = Extraction.objects.filter(pk=extraction_id).first()
        if extraction is None:
            raise CommandError(f"Extraction {extraction_id} does not exist; `manage.py extraction list` shows them.")
        return extraction

    def do_list(self, options):
        rows = selectors.extraction_list(status=options["status"])[: options["limit"]]
        if options["json"]:
            self.stdout.write(json.dumps([
                {**e.event_payload(), "model": e.model.name, "dataset": e.dataset.name,
                 "created_at": e.created_at.isoformat()} for e in rows
            ], indent=2))
            return
        self.stdout.write(f"{'id':>5}  {'status':<11} {'progress':<15} {'model':<16} {'dataset':<16} error")
        for e in rows:
            progress = f"{e.samples_processed}/{e.total_samples}"
            error = f"{e.error_type}: {e.error_message[:60]}" if e.error_type else ""
            if error and e.status in Extraction.ACTIVE:  # the failure is behind it: it runs (or waits) again
                error = f"resumed after {error}"
            self.stdout.write(f"{e.pk:>5}  {e.status:<11} {progress:<15} {e.model.name[:16]:<16} {e.dataset.name[:16]:<16} {error}")

    def do_cancel(self, options):
        extraction = services.extraction_cancel(extraction=self._get(options["extraction_id"]))
        state = "cancelled" if extraction.status == Extraction.Status.CANCELLED else "stopping after its current batch"
        self.stdout.write(f"Extraction {extraction.pk} {state}.")

    def do_retry(self, options):
        original = self._get(options["extraction_id"])
        given = dict(batch_size=options["batch_size"], max_samples=options["max_samples"],
                     max_length=options["max_length"])
        if options["suggested"]:
            retry = services.extraction_retry_suggested(extraction=original, via="from the command line", **given)
        else:
            retry = services.extraction_retry(extraction=original, reason="retried from the command line", **given)
        self.stdout.write(f"Extraction {retry.pk} retries {original.pk} with batch size {retry.batch_size}.")
        if options["wait"]:
            follow(self, retry)
