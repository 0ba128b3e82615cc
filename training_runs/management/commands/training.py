import json
import time

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from jobsite.errors import JobInputError, counted
from jobsite.lifecycle import TransitionError
from training_runs import selectors, services
from training_runs.models import Corpus, TrainingRun

Status = TrainingRun.Status

# What each bar counts: (unit, field done, field total), in the order the stages run.
STAGE_UNITS = {
    "generating": ("chunk", "processed_chunks", "total_chunks"),
    "embedding": ("text", "texts_embedded", "texts_total"),
    "training": ("epoch", "epochs_done", "epochs"),
}
STAGES = list(STAGE_UNITS)


class Command(BaseCommand):
    help = "Training runs: generate pairs, review, train, proceed after a failure, remove, status."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        generate = sub.add_parser("generate", help="start generating (query, chunk) pairs for a corpus")
        generate.add_argument("corpus", help="corpus name, or a file/directory under the data directory (the corpus "
                                             "made from it before, or a new one)")
        generate.add_argument("--name", default="", help="make a new corpus from the path, with this name "
                                                          "(default: the file or directory name)")
        generate.add_argument("--generator", default="local", choices=TrainingRun.Generator.values)
        generate.add_argument("--queries-per-chunk", type=int, default=2)
        generate.add_argument("--chunk-size", type=int, default=500)
        generate.add_argument("--wait", action="store_true")
        review = sub.add_parser("review", help="approve or reject pairs")
        review.add_argument("run_id", type=int)
        review.add_argument("decision", choices=["approve", "reject"])
        review.add_argument("--pairs", help="comma separated pair ids (default: every pending pair)")
        edit = sub.add_parser("edit", help="rewrite a pair's query (the pair is then approved)")
        edit.add_argument("run_id", type=int)
        edit.add_argument("pair_id", type=int)
        edit.add_argument("query", help="the new query, in quotes")
        train = sub.add_parser("train", help="train the adapter on the approved pairs")
        train.add_argument("run_id", type=int)
        train.add_argument("--epochs", type=int, help="at most this many epochs (default 8)")
        train.add_argument("--batch-size", type=int)
        train.add_argument("--learning-rate", type=float)
        train.add_argument("--patience", type=int, help="stop once validation recall@5 has not improved for this "
                                                        "many epochs (default 3)")
        train.add_argument("--wait", action="store_true")
        adopt = sub.add_parser("adopt", help="adopt the adapter of a completed run that did not adopt it (search then "
                                             "goes through it)")
        adopt.add_argument("run_id", type=int)
        adopt.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        stop = sub.add_parser("stop", help="stop a generating or training run (Proceed continues it later)")
        stop.add_argument("run_id", type=int)
        proceed = sub.add_parser("proceed", help="continue a failed run where it stopped")
        proceed.add_argument("run_id", type=int)
        proceed.add_argument("--wait", action="store_true")
        remove = sub.add_parser("remove", help="remove a failed, stopped, unreviewed or completed run: its pairs and "
                                               "files are deleted, its row stays in the history")
        remove.add_argument("run_id", type=int)
        remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        search = sub.add_parser("search", help="the chunks nearest to a query through a completed run's adapter")
        search.add_argument("run_id", type=int)
        search.add_argument("query", help="the query, in quotes")
        search.add_argument("-k", type=int, default=5, help="how many chunks (default 5)")
        status = sub.add_parser("status", help="runs and their progress")
        status.add_argument("run_id", type=int, nargs="?")
        status.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        try:
            getattr(self, f"do_{options['action']}")(options)
        except (TransitionError, JobInputError) as exc:
            raise CommandError(str(exc))

    def _run(self, run_id: int) -> TrainingRun:
        run = TrainingRun.objects.filter(pk=run_id).first()
        if run is None:
            raise CommandError(f"Training run {run_id} does not exist; `manage.py training status` lists them.")
        return run

    def do_generate(self, options):
        params = {"generator": options["generator"], "queries_per_chunk": options["queries_per_chunk"]}
        corpus = None if options["name"] else Corpus.objects.filter(name=options["corpus"]).first()
        if corpus is not None:
            run = services.training_run_generate(corpus=corpus, **params)
        else:
            try:
                run, corpus, created = services.training_run_generate_from_path(
                    path=options["corpus"], name=options["name"], chunk_size=options["chunk_size"], **params)
            except JobInputError as exc:
                if exc.field == "name" and not options["name"]:  # the name came from the path: say how to pick one
                    raise CommandError(f"{exc} Give the new corpus a name with --name.") from None
                raise
            made = "" if created else f" (made from {corpus.source} before)"
            self.stdout.write(f"Corpus {corpus.name}{made}: {counted(corpus.num_documents, 'document')}, "
                              f"{counted(corpus.chunks.count(), 'chunk')}.")
        self.stdout.write(f"Training run {run.pk} is generating pairs for {counted(run.total_chunks, 'chunk')}.")
        if options["wait"]:
            self.follow(run)

    def do_review(self, options):
        ids = None if options["pairs"] is None else _pair_ids(options["pairs"])
        run = self._run(options["run_id"])
        decision = "approved" if options["decision"] == "approve" else "rejected"
        updated = services.training_run_review(run=run, decision=decision, pair_ids=ids)
        self.stdout.write(services.review_sentence(run, updated=updated, decision=decision))

    def do_edit(self, options):
        run = self._run(options["run_id"])
        pair = services.training_run_pair_edit(run=run, pair_id=options["pair_id"], query=options["query"])
        self.stdout.write(f"Pair {pair.pk} of training run {run.pk} now asks {pair.query!r} and is approved.{run.review_note}")

    def do_train(self, options):
        run = services.training_run_train(run=self._run(options["run_id"]), epochs=options["epochs"],
                                          batch_size=options["batch_size"], learning_rate=options["learning_rate"],
                                          patience=options["patience"])
        self.stdout.write(f"Training run {run.pk} is training for at most {counted(run.epochs, 'epoch')}, stopping "
                          f"early once validation recall@5 has not improved for {counted(run.patience, 'epoch')}.")
        if options["wait"]:
            self.follow(run)

    def do_adopt(self, options):
        run = self._run(options["run_id"])
        services.training_run_check_adoptable(run=run)  # before the question: nobody confirms what cannot happen
        if not options["yes"]:
            try:
                answer = input(f"{run.verdict}\nAdopt training run {run.pk}'s adapter anyway? [y/N] ")
            except EOFError:  # no terminal and nothing piped in: no answer is a no
                self.stdout.write("")
                raise CommandError(f"No answer to the confirmation; nothing adopted. To adopt without a prompt, run "
                                   f"`manage.py training adopt {run.pk} --yes`.") from None
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("Nothing adopted.")
        run = services.training_run_adopt(run=run)
        self.stdout.write(run.adopted_sentence)

    def do_stop(self, options):
        run = services.training_run_stop(run=self._run(options["run_id"]))
        if run.cancel_requested:
            self.stdout.write(f"Training run {run.pk} stops after its current step, then waits for proceed or remove.")
        else:
            self.stdout.write(f"Training run {run.pk} stopped ({run.progress_label}); proceed continues it, remove "
                              "discards it.")

    def do_proceed(self, options):
        run = services.training_run_proceed(run=self._run(options["run_id"]))
        self.stdout.write(run.proceeds_sentence)
        if options["wait"]:
            self.follow(run)

    def do_remove(self, options):
        run = self._run(options["run_id"])
        services.training_run_check_removable(run=run)  # before the question: nobody confirms what cannot happen
        if not options["yes"]:
            try:
                verdict = f", {run.verdict_label}" if run.status == Status.COMPLETED else ""
                answer = input(f"Remove training run {run.pk} ({run.status_label}, {counted(run.pair_count, 'pair')}"
                               f"{verdict})? Its pairs and files are deleted; its row stays in the history. [y/N] ")
            except EOFError:  # no terminal and nothing piped in: no answer is a no
                self.stdout.write("")  # end the question's line
                raise CommandError(f"No answer to the confirmation; nothing removed. To remove without a prompt, run "
                                   f"`manage.py training remove {run.pk} --yes`.") from None
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("Nothing removed.")
        services.training_run_remove(run=run)
        self.stdout.write(f"Training run {run.pk} removed: its pairs and files are deleted; its row stays in the "
                          "history.")

    def do_search(self, options):
        hits = selectors.training_run_search(run=self._run(options["run_id"]), query=options["query"], k=options["k"])
        for hit in hits:
            text = " ".join(hit["text"].split())[:100]
            self.stdout.write(f"{hit['score']:.4f}  {hit['document']} #{hit['index']}  {text}")

    def do_status(self, options):
        runs = [self._run(options["run_id"])] if options["run_id"] is not None else list(selectors.training_run_list()[:50])
        if options["json"]:
            self.stdout.write(json.dumps([r.event_payload() for r in runs], indent=2))
            return
        if not runs:
            self.stdout.write("No training runs yet; start one with `manage.py training generate <corpus>`.")
            return
        self.stdout.write(f"{'run':>4}  {'status':<20} {'progress':<26} {'pairs':>7}  corpus")
        for run in runs:
            # Stalled: its worker has been silent past the stall limit (Resume on the page, or `jobs recover`).
            label = f"{run.status_label} (stalled)" if run.is_stalled else run.status_label
            line = (f"{run.pk:>4}  {label:<20} {run.progress_label:<26} {run.pair_count:>7,}  "
                    f"{run.corpus.name}")
            if run.metrics.get("after"):
                before, after = run.metrics["before"], run.metrics["after"]
                line += "  " + "  ".join(f"{k} {before[k]:.2f}->{after[k]:.2f}" for k in after)
            if run.is_removed:
                line += f"  {run.removed_label}; verdict: {run.verdict_label}"
            elif run.status in TrainingRun.RETRYABLE_FROM and run.error_message:  # an old error is not news
                line += f"  {run.error_label}: {run.error_message[:80]}"
            if run.is_stalled:
                line += (f"  no heartbeat for {run.heartbeat_age_s:.0f} s: Resume it on the page, or run "
                         "`manage.py jobs recover`")
            self.stdout.write(line)
            if run.verdict:
                self.stdout.write(f"      {run.verdict}")

    def follow(self, run: TrainingRun, poll_s: float = 0.5) -> None:
        """A progress bar for each stage of the current phase (chunks; texts embedded, then
        epochs); exit 1 with the failure sentence."""
        phase = run.status
        stage, bar = None, None
        try:
            while True:
                run.refresh_from_db()
                now = _stage(run, phase)
                # Stages only go forward: embedding, then epochs.
                if bar is None or STAGES.index(now) > STAGES.index(stage):
                    if bar is not None:
                        self._draw(bar, run, stage)  # where the stage ended, e.g. 1479/1479 texts
                        bar.close()
                    stage = now
                    unit, done, total = STAGE_UNITS[stage]
                    # initial: what an earlier attempt did is not counted in the rate.
                    bar = tqdm(desc=f"run {run.pk} {stage}", unit=unit, total=getattr(run, total),
                               initial=getattr(run, done), file=self.stderr._out)
                self._draw(bar, run, stage)
                if run.status != phase:
                    break
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()
        if run.status in TrainingRun.RETRYABLE_FROM:
            raise CommandError(f"Training run {run.pk} {run.status_label} ({run.error_label}): {run.error_message} "
                               f"Proceed with `manage.py training proceed {run.pk}` or remove it.")
        self.do_status({"run_id": run.pk, "json": False})

    @staticmethod
    def _draw(bar, run: TrainingRun, stage: str) -> None:
        _unit, done, total = STAGE_UNITS[stage]
        bar.total, bar.n = getattr(run, total), getattr(run, done)
        bar.set_postfix_str(run.status)
        bar.refresh()


def _pair_ids(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise CommandError(f"--pairs must be pair ids separated by commas, e.g. 4,5,6; got {value!r}.") from None


def _stage(run: TrainingRun, phase: str) -> str:
    """By the phase followed, not the status now, so the last draw shows where it ended."""
    if phase == Status.GENERATING:
        return "generating"
    return "embedding" if run.is_embedding else "training"
