import argparse
import json

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from extraction import selectors, services
from extraction.management.commands.extract import csv, follow, positive, shards
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


def shard_line(shard: dict) -> str:
    """One shard: index, status, samples done/total, worker, attempt, and while it runs its
    heartbeat's age and whether it is stalled."""
    age = shard["heartbeat_age_s"]
    parts = [f"shard {shard['index']}", shard["status"], f"{shard['samples_processed']}/{shard['total_samples']}",
             f"worker {shard['worker'] or '-'}", f"attempt {shard['attempt']}"]
    if age is not None:
        parts.append(f"heartbeat {age:.0f} s ago")
    if shard["stalled"]:
        parts.append("stalled")
    if shard["error_type"]:
        parts.append(f"{shard['error_type']}: {shard['error_message'][:60]}")
    parts += [f"{host} refuses it: {sentence}" for host, sentence in sorted(shard["refusals"].items())]
    return "  ".join(parts)


class Command(BaseCommand):
    help = "List, cancel, retry or export extractions."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="extractions, newest first")
        listing.add_argument("--status", choices=Extraction.Status.values)
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        listing.add_argument("--limit", type=positive, default=50, help="at most this many (default 50)")
        listing.add_argument("--model", help="only this model's (its name or id)")
        cancel = sub.add_parser("cancel", help="cancel a queued or running extraction")
        cancel.add_argument("extraction_id", type=int)
        dismiss = sub.add_parser("dismiss", help="move a failed or cancelled extraction out of the jobs needing "
                                                 "attention, into the history")
        dismiss.add_argument("extraction_id", type=int)
        retry = sub.add_parser("retry", help="retry a failed or cancelled extraction as a new linked job")
        retry.add_argument("extraction_id", type=int)
        retry.add_argument("--batch-size", type=int, choices=VALID_BATCH_SIZES)
        retry.add_argument("--max-samples", type=max_samples, metavar="N|all",
                           help="a number of samples, or 'all' for the whole dataset (default: the original's)")
        retry.add_argument("--max-length", type=int)
        retry.add_argument("--shards", type=shards, metavar="N|auto", help="workers that run it at once "
                                                                           "(default: the original's count)")
        retry.add_argument("--suggested", action="store_true",
                           help="use the parameters the failure suggested; --batch-size, --max-samples or "
                                "--max-length given as well override the suggestion")
        retry.add_argument("--reason", default="", help="why, kept on the new extraction (at most as long as the "
                                                        "page's reason field)")
        retry.add_argument("--wait", action="store_true")
        export = sub.add_parser("export", help="write an extraction's output in a format other tools read")
        export.add_argument("extraction_id", type=int)
        export.add_argument("directory", help="a new or empty directory to write into")
        export.add_argument("--format", required=True, choices=["hf-datasets"],
                            help="hf-datasets: a datasets.Dataset laid out as SAELens's cached activations")
        export.add_argument("--context-size", type=positive, default=128,
                            help="tokens per sequence (row) of the dataset (default 128)")
        export.add_argument("--hooks", type=csv, metavar="NAMES",
                            help="TransformerLens names separated by commas, e.g. blocks.5.hook_mlp_out "
                                 "(default: every hook point of the output)")

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
        model = None
        if options["model"]:
            model = selectors.model_find(options["model"])
            if model is None:
                raise CommandError(f"No model named or numbered {options['model']!r} is registered.")
        rows = selectors.extraction_list(status=options["status"], model_id=model.pk if model else None)[
            : options["limit"]]
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
            for shard in e.shard_list():
                self.stdout.write(f"       {shard_line(shard)}")

    def do_cancel(self, options):
        extraction = services.extraction_cancel(extraction=self._get(options["extraction_id"]))
        state = "cancelled" if extraction.status == Extraction.Status.CANCELLED else "stopping after its current batch"
        self.stdout.write(f"Extraction {extraction.pk} {state}.")

    def do_dismiss(self, options):
        extraction = services.extraction_dismiss(extraction=self._get(options["extraction_id"]))
        self.stdout.write(f"Extraction {extraction.pk} is dismissed; it stays in the history, with its files.")

    def do_retry(self, options):
        original = self._get(options["extraction_id"])
        given = dict(batch_size=options["batch_size"], max_samples=options["max_samples"],
                     max_length=options["max_length"])
        reason = " ".join(options["reason"].split())
        if options["suggested"]:
            if options["shards"] is not None:
                raise CommandError("--shards goes with a retry of your own parameters, not --suggested; leave one out.")
            via = f"from the command line ({reason})" if reason else "from the command line"
            retry = services.extraction_retry_suggested(extraction=original, via=via, **given)
        else:
            retry = services.extraction_retry(extraction=original, reason=reason or "retried from the command line",
                                              shards=options["shards"], **given)
        self.stdout.write(f"Extraction {retry.pk} retries {original.pk} with batch size {retry.batch_size}.")
        self.stdout.write(services.retry_starts_from(original=original, retry=retry))
        if options["wait"]:
            follow(self, retry)

    def do_export(self, options):
        from extraction.export import export_hf_datasets  # datasets and pyarrow load only for an export
        from extraction.reader import OutputError

        extraction = self._get(options["extraction_id"])
        if not extraction.output_dir.is_dir():
            raise CommandError(f"Extraction {extraction.pk} has no output yet (it is {extraction.status}); "
                               "export it once it has run.")
        bars = []  # drawn once the export starts writing, so that a refusal prints its sentence alone

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, unit="sequence", desc=f"export {extraction.pk}", file=self.stderr._out))
            bars[0].update(done - bars[0].n)

        try:
            result = export_hf_datasets(extraction.output_dir, options["directory"],
                                        context_size=options["context_size"], hooks=options["hooks"],
                                        progress=progress)
        except OutputError as exc:
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            raise CommandError(f"Export stopped; nothing was written to {options['directory']}.",
                               returncode=130) from None
        finally:
            for bar in bars:
                bar.close()
        done = "" if result.complete else f" (a partial run: its {result.samples:,} checkpointed samples only)"
        self.stdout.write(
            f"Exported extraction {extraction.pk}{done} to {result.path}: {result.sequences:,} sequences of "
            f"{result.context_size} tokens ({result.tokens:,} tokens, {result.rows_left_over:,} left over), "
            f"{result.dtype}, columns {', '.join(result.columns)}. Load it with datasets.load_from_disk("
            f"{str(result.path)!r}), or train SAELens on it with cached_activations_path={str(result.path)!r}, "
            f"context_size={result.context_size} and hook_name one of {', '.join(result.hook_columns)}."
        )
