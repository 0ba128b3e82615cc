import argparse
import logging
import time

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from extraction import selectors, services
from extraction.constants import VALID_BATCH_SIZES
from extraction.forms import parse_layers
from extraction.models import Extraction
from jobsite.errors import JobInputError, counted
from jobsite.health import workers_missing
from jobsite.lifecycle import TransitionError


def positive(value: str) -> int:
    """argparse type: a whole number of at least 1 (argparse turns the error into a usage line)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}")
    return number


def shards(value: str) -> int | str:
    """--shards: a number or auto, left for the service to check (its sentence is the error)."""
    from extraction.forms import parse_shards  # noqa: PLC0415

    return parse_shards(value)


def csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Command(BaseCommand):
    help = "Start an activation extraction (MODEL and DATASET are names, ids or paths; a path registers it)."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("dataset")
        parser.add_argument("--layers", default="", help="block indices, e.g. 0,3 or 0-3 (a range includes both ends); "
                                                         "may be left out when every hook names its layer")
        parser.add_argument("--hooks", default="residual", help=(
            "comma separated hook points at every layer: residual (resid_post), mlp, attention, resid_pre, resid_mid, "
            "mlp_hidden, or TransformerLens's names (hook_mlp_out; blocks.5.hook_mlp_out names layer 5 too)"))
        parser.add_argument("--batch-size", type=int, default=8, choices=VALID_BATCH_SIZES)
        parser.add_argument("--max-samples", type=int)
        parser.add_argument("--max-length", type=int, default=None,
                            help="tokens kept per sample (default 512, or the model's position limit when smaller)")
        # --dtype is the old name, kept working (deprecated): the field is storage_dtype everywhere.
        parser.add_argument("--storage-dtype", "--dtype", dest="storage_dtype", default="float32",
                            choices=Extraction.StorageDtype.values,
                            help="how activations are stored (--dtype is its deprecated old name)")
        parser.add_argument("--auto-retry-on-oom", action="store_true")
        parser.add_argument("--shards", type=shards, default=1, metavar="N|auto",
                            help="workers that run it at once, each on its own part of the samples (auto: one per "
                                 "live worker); the files are the same bytes whatever the count")
        parser.add_argument("--wait", action="store_true", help="follow progress until the job ends (exit 1 if it fails)")

    def handle(self, *args, **options):
        logging.getLogger("django-q").setLevel(logging.WARNING)  # its "Enqueued" line is not this command's output
        try:
            layers = parse_layers(options["layers"])  # as the page's Layers field reads them
        except ValidationError as exc:
            raise CommandError(f"--layers {options['layers']!r}: {' '.join(exc.messages)}") from None
        try:
            model = _find_or_register("model", options["model"], selectors.model_find, services.model_register)
            dataset = _find_or_register("dataset", options["dataset"], selectors.dataset_find,
                                        services.dataset_register)
            extraction, created = services.extraction_start(
                model=model, dataset=dataset, layers=layers, hooks=csv(options["hooks"]),
                batch_size=options["batch_size"], max_samples=options["max_samples"],
                max_length=options["max_length"], storage_dtype=options["storage_dtype"],
                auto_retry_on_oom=options["auto_retry_on_oom"], shards=options["shards"],
            )
        except (JobInputError, TransitionError) as exc:
            raise CommandError(str(exc))
        if created:
            self.stdout.write(f"Queued extraction {extraction.pk} ({model.name} on {dataset.name}).")
        else:
            asked = extraction.identical_sentence(batch_size=options["batch_size"],
                                                  auto_retry_on_oom=options["auto_retry_on_oom"])
            self.stdout.write(f"{asked} No second copy was started.")
        if options["wait"]:
            follow(self, extraction)


def follow(command: BaseCommand, extraction: Extraction, poll_s: float = 0.5) -> None:
    """Show a progress bar until the job is terminal; exit 1 with the failure sentence. Ctrl-C
    stops following, not the job (exit 130, saying how to cancel it)."""
    try:
        _follow(command, extraction, poll_s)
    except KeyboardInterrupt:
        raise CommandError(f"Stopped following extraction {extraction.pk}; it goes on (`manage.py extraction list` "
                           f"shows it, `manage.py extraction cancel {extraction.pk}` cancels it).",
                           returncode=130) from None


def _follow(command: BaseCommand, extraction: Extraction, poll_s: float) -> None:
    said_no_worker, checked_at = False, 0.0
    with tqdm(total=extraction.total_samples or None, unit="sample", desc=f"extraction {extraction.pk}",
              file=command.stderr._out) as bar:
        while True:
            extraction.refresh_from_db()
            if extraction.total_samples and bar.total != extraction.total_samples:
                bar.total = extraction.total_samples
            bar.n = extraction.samples_processed
            bar.set_postfix_str(extraction.status + (f" attempt {extraction.attempt}" if extraction.attempt > 1 else ""))
            bar.refresh()
            if extraction.is_terminal:
                break
            if extraction.status in extraction.ACTIVE and time.monotonic() - checked_at > 5:
                checked_at = time.monotonic()
                missing = workers_missing()
                if missing and not said_no_worker:
                    bar.write(f"No worker is running ({missing}): the extraction waits until one starts.",
                              file=command.stderr._out)
                said_no_worker = bool(missing)
            time.sleep(poll_s)
    if extraction.status == Extraction.Status.COMPLETED:
        command.stdout.write(
            f"Extraction {extraction.pk} completed: {counted(extraction.total_samples, 'sample')}, "
            f"{counted(extraction.total_tokens, 'token')} in {extraction.output_dir}"
            + (f" ({counted(extraction.truncated_samples, 'sample')} cut to {extraction.max_length:,} tokens)"
               if extraction.truncated_samples else "")
            + (f" ({extraction.clamped_tokens:,} token ids clamped to the vocabulary)" if extraction.clamped_tokens else "")
            + (f". Warning: {extraction.inf_values:,} values were beyond float16's range (+-65504) and are stored as "
               "infinity; extract again with --storage-dtype float32 to keep them" if extraction.inf_values else "")
        )
        return
    if extraction.status == Extraction.Status.CANCELLED:
        raise CommandError(f"Extraction {extraction.pk} was cancelled.")
    hint = f" Suggested retry: {extraction.suggested_retry_params}." if extraction.suggested_retry_params else ""
    raise CommandError(f"Extraction {extraction.pk} failed ({extraction.error_type}): "
                       f"{extraction.error_message.rstrip('.')}.{hint}")


def _find_or_register(kind: str, given: str, find, register):
    """A registered model or dataset by name or id, else the path to register. A name that is not
    registered is said to be one: the path's refusal alone ("... does not exist") would not say
    that names and ids are taken too."""
    found = find(given)
    if found is not None:
        return found
    try:
        return register(path=given)
    except JobInputError as exc:
        if "/" in given:
            raise
        raise JobInputError(f"No {kind} named or numbered {given!r} is registered (the {kind}s page and "
                            f"/api/v1/{kind}s list them), and as a path: {exc}") from None
