from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q, Value
from django.db.models.functions import Lower

from jobsite.errors import RETRYABLE, ErrorType
from jobsite.models import Job


class Corpus(models.Model):
    """Documents cut into chunks; a training run generates queries for every chunk."""

    name = models.CharField(max_length=200, unique=True)
    source = models.CharField(max_length=1000, help_text="file or directory under JOBSITE_DATA_DIR")
    chunk_size = models.PositiveIntegerField(default=500, help_text="characters per chunk")
    chunk_overlap = models.PositiveIntegerField(default=50, help_text="characters shared by neighbouring chunks")
    num_documents = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "corpora"
        # "Policy" beside "policy" reads as one corpus in every list (and is one folder on a
        # case-insensitive disk).
        constraints = [models.UniqueConstraint(Lower("name"), name="corpus_name_unique_ignoring_case")]

    def __str__(self):
        return self.name


class Chunk(models.Model):
    corpus = models.ForeignKey(Corpus, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField(help_text="position in the corpus; generation goes in this order")
    document = models.CharField(max_length=500)
    text = models.TextField()

    class Meta:
        ordering = ["corpus", "index"]
        constraints = [models.UniqueConstraint(fields=["corpus", "index"], name="chunk_unique_index")]

    def __str__(self):
        return f"{self.document} #{self.index}"


class TrainingRunStatus(models.TextChoices):
    GENERATING = "generating"
    GENERATED = "generated"
    TRAINING = "training"
    COMPLETED = "completed"
    GENERATING_FAILED = "generating_failed"
    TRAINING_FAILED = "training_failed"


class TrainingRun(Job):
    """Phase 1 generates (query, chunk) pairs, a person reviews them, phase 2 trains an adapter.

    The status names the phase; a worker holds a phase through the `worker` lock (CLAIMED is
    empty). A lost worker, a timeout or a database outage is retried automatically from where the
    phase stopped, while claims of the phase (Proceeds included) stay under JOBSITE_MAX_ATTEMPTS;
    any other failure waits for a person to proceed or remove it.
    """

    Status = TrainingRunStatus

    class Generator(models.TextChoices):
        LOCAL = "local", "Deterministic local generator (CPU, offline)"
        CAUSAL_LM = "causal_lm", "Causal language model (transformers generate)"

    KIND = "training"
    TASK = "training_runs.tasks.run_training_phase"
    CLAIMED = ""
    RUNNING = frozenset({Status.GENERATING, Status.TRAINING})
    ACTIVE = RUNNING
    TERMINAL = frozenset({Status.COMPLETED})
    RETRYABLE_FROM = frozenset({Status.GENERATING_FAILED, Status.TRAINING_FAILED})
    # A run waiting for review can be discarded too: nothing works on it, and it blocks new generations.
    # So can a completed one: search stops using it.
    REMOVABLE = RETRYABLE_FROM | {Status.GENERATED, Status.COMPLETED}
    # What every page, the admin, the commands and the API call each status.
    STATUS_LABELS = {
        Status.GENERATING: "generating", Status.GENERATED: "generated", Status.TRAINING: "training",
        Status.COMPLETED: "completed", Status.GENERATING_FAILED: "generating failed",
        Status.TRAINING_FAILED: "training failed",
    }
    FAILED_IN = {Status.GENERATING: Status.GENERATING_FAILED, Status.TRAINING: Status.TRAINING_FAILED}
    TRANSITIONS = {
        Status.GENERATING: {Status.GENERATED, Status.GENERATING_FAILED},
        Status.GENERATED: {Status.TRAINING},
        Status.TRAINING: {Status.COMPLETED, Status.TRAINING_FAILED},
        Status.GENERATING_FAILED: {Status.GENERATING},
        Status.TRAINING_FAILED: {Status.TRAINING},
        Status.COMPLETED: set(),
    }

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.GENERATING, db_index=True)
    corpus = models.ForeignKey(Corpus, on_delete=models.PROTECT, related_name="runs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    generator = models.CharField(max_length=20, choices=Generator.choices, default=Generator.LOCAL)
    queries_per_chunk = models.PositiveIntegerField(default=2)
    # Kept through failures: a proceed shows e.g. 51/80 and continues, never 51/30.
    total_chunks = models.PositiveIntegerField(default=0)
    processed_chunks = models.PositiveIntegerField(default=0)
    pair_count = models.PositiveIntegerField(default=0)
    epochs = models.PositiveIntegerField(default=8)
    train_batch_size = models.PositiveIntegerField(default=32)
    learning_rate = models.FloatField(default=1e-3)
    # Early stopping: training ends once validation recall@5 has not improved for this many epochs.
    patience = models.PositiveIntegerField(default=3)
    epochs_done = models.PositiveIntegerField(default=0)
    # The training phase embeds every chunk and approved query before its first epoch; these
    # count those texts and how many are embedded (batches kept from an earlier attempt included).
    texts_total = models.PositiveIntegerField(default=0)
    texts_embedded = models.PositiveIntegerField(default=0)
    # {"before": {"recall@1": .., ...}, "after": {...}, "train_pairs": n, "eval_pairs": n}; partial while training.
    metrics = models.JSONField(default=dict, blank=True)
    loss_curve = models.JSONField(default=list, blank=True, help_text="mean training loss per epoch")
    # Validation recall@k per epoch ([{"recall@1": .., "recall@5": .., "recall@10": ..}, ...]), the
    # epoch whose adapter was kept (0: none beat the encoder alone), and whether search uses it.
    validation_curve = models.JSONField(default=list, blank=True, help_text="validation recall@k per epoch")
    best_epoch = models.PositiveIntegerField(null=True, blank=True)
    # None until the run completes; False: no epoch beat the encoder alone, so search uses the encoder.
    adopted = models.BooleanField(null=True, blank=True)
    # Set when a person adopted an adapter the run itself did not adopt.
    adopted_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    adopted_at = models.DateTimeField(null=True, blank=True)
    # Generated queries the filter dropped (empty, too short or long, not text, a copy of the chunk).
    queries_dropped = models.PositiveIntegerField(default=0)
    # A removed run keeps its row (who, when, its pair count and verdict); its pairs and files go.
    removed_at = models.DateTimeField(null=True, blank=True, db_index=True)
    removed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    generating_started_at = models.DateTimeField(null=True, blank=True)
    generated_at = models.DateTimeField(null=True, blank=True)
    training_started_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # add_trainingrun starts one (generation); reviewing pairs is change_trainingpair.
        permissions = [
            ("train_trainingrun", "Can start training of reviewed training run"),
            ("stop_trainingrun", "Can stop training run"),
            ("proceed_trainingrun", "Can proceed with failed training run"),
            ("resume_trainingrun", "Can resume stalled training run"),
            ("remove_trainingrun", "Can remove training run"),
            ("adopt_trainingrun", "Can adopt training run adapter"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=TrainingRunStatus.values), name="training_run_status_valid"),
            models.CheckConstraint(
                condition=Q(status="completed", finished_at__isnull=False)
                | (~Q(status="completed") & Q(finished_at__isnull=True)),
                name="training_run_finished_at_iff_completed",
            ),
            # At most one run that is not completed, whoever asks and however concurrently.
            # A removed run is history only: it blocks nothing.
            models.UniqueConstraint(Value(1), condition=~Q(status="completed") & Q(removed_at__isnull=True),
                                    name="training_run_one_open"),
        ]

    def __str__(self):
        return f"Training run {self.pk} ({self.status})"

    @property
    def output_dir(self) -> Path:
        return settings.JOBSITE_DATA_DIR / "training_runs" / str(self.pk)

    @classmethod
    def live(cls) -> Q:
        return Q(removed_at__isnull=True)

    @property
    def is_removed(self) -> bool:
        return self.removed_at is not None

    @property
    def status_label(self) -> str:
        """What the page, the admin, `training status` and the API call the status, one word set for
        all: a run stopped on request is "stopped" (it is kept in a *_failed status with CANCELLED,
        since the design has no stopped status), not failed; a removed run is "removed"."""
        if self.is_removed:
            return "removed"
        if self.status in self.RETRYABLE_FROM and self.error_type == ErrorType.CANCELLED:
            return "stopped"
        return self.STATUS_LABELS.get(self.status, self.status)

    @property
    def verdict_label(self) -> str:
        """Whether search used the run's adapter: "adopted", "not adopted", or "—" before it completed."""
        return {True: "adopted", False: "not adopted"}.get(self.adopted, "—")

    @property
    def keyword_weight(self) -> float | None:
        """The weight of keyword matching that goes with the chosen epoch's adapter (chosen on
        validation with it; 0: the adapter alone, as for runs trained before keyword matching),
        which search adds once the adapter is adopted; None until the run completes."""
        chosen = (self.metrics or {}).get("validation_after")
        return chosen.get("keyword_weight", 0.0) if self.status == self.Status.COMPLETED and chosen else None

    @property
    def keyword_phrase(self) -> str:
        """" with keyword matching weighted 0.3" where search adds it, else ""."""
        return f" with keyword matching weighted {self.keyword_weight:g}" if self.keyword_weight else ""

    @property
    def removed_label(self) -> str:
        """Who removed the run and when ("" while it is not removed), as the history rows say it."""
        if not self.is_removed:
            return ""
        who = f" by {self.removed_by.get_username()}" if self.removed_by_id else ""
        return f"removed{who} on {self.removed_at:%Y-%m-%d %H:%M} UTC"

    @property
    def retry_available(self) -> bool:
        return super().retry_available and not self.is_removed

    @property
    def state_phrase(self) -> str:
        """The status as a sentence says it: "training run 8 has a failed generation"."""
        if self.is_removed:
            return "was removed"
        if self.status_label == "stopped":
            return "is stopped"
        return {
            self.Status.GENERATING: "is generating pairs", self.Status.GENERATED: "is waiting for review",
            self.Status.GENERATING_FAILED: "has a failed generation", self.Status.TRAINING_FAILED: "has a failed training",
        }.get(self.status, f"is {self.status}")

    @property
    def is_embedding(self) -> bool:
        """In the training phase with texts still to embed: the epochs have not started."""
        return self.status in (self.Status.TRAINING, self.Status.TRAINING_FAILED) and (
            self.texts_embedded < self.texts_total)

    @property
    def progress_counts(self) -> tuple[int, int]:
        """(done, total) of what the phase counts now: chunks, then texts embedded, then epochs."""
        if self.status in (self.Status.GENERATING, self.Status.GENERATING_FAILED):
            return self.processed_chunks, self.total_chunks
        if self.is_embedding:
            return self.texts_embedded, self.texts_total
        return self.epochs_done, self.epochs

    @property
    def embedding_label(self) -> str:
        return f"{self.texts_embedded:,} of {self.texts_total:,} texts"

    @property
    def epochs_label(self) -> str:
        return f"{self.epochs_done} of {self.epochs} epoch{'s' if self.epochs != 1 else ''}"

    @property
    def progress_label(self) -> str:
        if self.status in (self.Status.GENERATING, self.Status.GENERATING_FAILED):
            return f"{self.processed_chunks:,}/{self.total_chunks:,}"
        # A failed training phase shows where it stopped, as the running one shows where it is.
        if self.is_embedding:
            # Until its first batch is stored the worker is loading the encoder: "0 of N" reads stuck.
            if self.status == self.Status.TRAINING and self.worker and not self.texts_embedded:
                return "Loading the encoder…"
            return f"Embedding {self.embedding_label}"
        if self.status in (self.Status.TRAINING, self.Status.TRAINING_FAILED):
            return self.epochs_label
        if self.status == self.Status.GENERATED:
            return f"{self.processed_chunks:,}/{self.total_chunks:,} chunks · {self.pair_count:,} pairs"
        if self.status == self.Status.COMPLETED:
            return self.epochs_label + (" (stopped early)" if self.epochs_done < self.epochs else "")
        return "—"

    @property
    def proceed_sentence(self) -> str:
        """What Proceed will do from where the run stands, in the words every caller shows."""
        if self.status in (self.Status.GENERATING, self.Status.GENERATING_FAILED):
            return f"generation continues after chunk {self.processed_chunks:,} of {self.total_chunks:,}"
        if self.epochs_done:
            return f"training resumes from its checkpoint after {self.epochs_label}"
        if self.texts_embedded:
            return f"embedding continues after {self.embedding_label}, then training starts"
        return "training starts from its first epoch (the texts embedded before are kept)"

    @property
    def proceeds_sentence(self) -> str:
        """What a Proceed did, in the words every caller shows."""
        return f"Training run {self.pk} proceeds: {self.proceed_sentence}."

    @property
    def stop_sentence(self) -> str:
        """What a Stop did, in the words every caller shows."""
        if self.cancel_requested and self.status in self.RUNNING:
            return f"Training run {self.pk} stops after its current step; Proceed continues it later."
        return f"Training run {self.pk} stopped; Proceed continues it, Delete discards it."

    @property
    def adopted_sentence(self) -> str:
        """What an Adopt did, in the words every caller shows."""
        return f"Training run {self.pk}'s adapter is adopted: search now goes through it."

    @property
    def review_note(self) -> str:
        """What a review's answer adds for a failed training: what Proceed will now do."""
        return f" Proceed: {self.proceed_sentence}." if self.status == self.Status.TRAINING_FAILED else ""

    # A failed run waits for a person: Proceed resumes it where it stopped, Remove discards it.
    PROCEED_OR_DELETE = "Proceed resumes the run where it stopped; Delete discards it."
    NEXT_STEPS = {
        ErrorType.CANCELLED: "Proceed continues where it stopped; Delete discards the run.",
        ErrorType.STORAGE: "Free space or fix permissions in the data directory, then Proceed.",
        ErrorType.DATABASE: "Proceed once the database is back: the run resumes where it stopped.",
        ErrorType.TIMEOUT: "Proceed resumes where it stopped; raise JOBSITE_TIMEOUT_S if it keeps timing out.",
        ErrorType.VALIDATION: "Fix what the message names (corpus, settings), then Proceed, or delete the run.",
        ErrorType.OOM: "Lower the batch size setting or free memory, then Proceed.",
    }

    @property
    def next_step(self) -> str:
        if not self.error_type or self.is_removed:
            return ""
        if self.error_type in RETRYABLE:
            # A failure with attempts left is requeued in the same transaction: its event says so.
            if self.status in self.ACTIVE or self.attempt < settings.JOBSITE_MAX_ATTEMPTS:
                return "Retried automatically: it continues where it stopped."
            return f"Its automatic attempts are used up (attempt {self.attempt}). " + self.NEXT_STEPS.get(
                self.error_type, self.PROCEED_OR_DELETE)
        return self.NEXT_STEPS.get(self.error_type, self.PROCEED_OR_DELETE)

    def cancelled_outcome(self) -> tuple[str, dict]:
        """A stopped run has no status of its own: it waits in its phase's failed status, from
        where Proceed continues it and Delete discards it."""
        if self.status == self.Status.GENERATING:
            when = f"after {self.processed_chunks:,} of {self.total_chunks:,} chunks"
        elif self.is_embedding:
            when = f"while embedding ({self.embedding_label})"
        else:
            when = f"after {self.epochs_label}"
        return self.failed_status(), {"error_type": ErrorType.CANCELLED, "error_message": f"Stopped on request {when}."}

    def failed_status(self) -> str:
        return self.FAILED_IN[self.status]

    def resume_status(self) -> str:
        return {v: k for k, v in self.FAILED_IN.items()}[self.status]

    @property
    def test_pair_count(self) -> int | None:
        """The pairs the result's recall was measured on (`eval_pairs` before there was a validation split)."""
        metrics = self.metrics or {}
        return metrics.get("test_pairs", metrics.get("eval_pairs"))

    # What to try when no epoch beat the encoder alone on validation.
    # What to try when no epoch beat the encoder alone on validation (fewer epochs would not help:
    # the best epoch is kept whatever follows it).
    NOT_ADOPTED_ADVICE = "Try more or better pairs, or a lower learning rate."

    @property
    def verdict(self) -> str:
        """A completed run's result in one sentence: whether search uses its adapter, and why.

        Empty until the run completes. Every caller (page, API, command, admin, history) shows it."""
        if self.status != self.Status.COMPLETED or self.adopted is None:
            return ""
        if self.is_removed:
            return (f"{self.verdict_label.capitalize()} when it was removed ({self.removed_label}); search no "
                    "longer uses it.")
        metrics = self.metrics or {}
        before, after = metrics.get("before") or {}, metrics.get("after") or {}
        val_before, val_after = metrics.get("validation_before") or {}, metrics.get("validation_after") or {}
        epoch = f"epoch {self.best_epoch} of {self.epochs_done}" if self.best_epoch else "its last epoch"
        if not val_before:  # trained before there was a validation split: judged on its held-out pairs
            held = f"held-out recall@5 {_moved(after, before, 5)}" if after and before else "no held-out recall"
            word = "Adopted" if self.adopted else "Not adopted"
            tail = "search uses it" if self.adopted else "search uses the encoder alone"
            return f"{word}: {epoch}, trained before validation existed ({held}); {tail}."
        test = f"test recall@5 {_moved(after, before, 5)}" if after else ""
        if not self.adopted:
            fell = [f"recall@{k} {_moved(val_after, val_before, k)}" for k in (1, 5, 10)
                    if val_after.get(f"recall@{k}", 0) < val_before.get(f"recall@{k}", 0)]
            why = (f"its best, {epoch}, fell at {', '.join(fell)}" if fell
                   else f"its best, {epoch}, is no better at any k")
            return (f"Not adopted: no epoch beat the encoder alone on validation ({why}), so search uses the encoder "
                    f"alone. {self.NOT_ADOPTED_ADVICE}")
        if self.adopted_at:
            who = f" by {self.adopted_by.get_username()}" if self.adopted_by_id else ""
            return (f"Adopted by hand{who}: {epoch}{self.keyword_phrase} did not beat the encoder alone on validation "
                    f"(recall@5 {_moved(val_after, val_before, 5)}); search uses it{'; ' + test if test else ''}.")
        return (f"Adopted {epoch}{self.keyword_phrase}: validation recall@5 {_moved(val_after, val_before, 5)}, no "
                f"worse at any k than the encoder alone{'; ' + test if test else ''}.")

    def event_payload(self) -> dict:
        return {
            **super().event_payload(),
            "status_label": self.status_label,
            "removed_at": self.removed_at.isoformat() if self.removed_at else None,
            "corpus_id": self.corpus_id,
            "total_chunks": self.total_chunks,
            "processed_chunks": self.processed_chunks,
            "pair_count": self.pair_count,
            "queries_dropped": self.queries_dropped,
            "progress_label": self.progress_label,
            "epochs": self.epochs,
            "epochs_done": self.epochs_done,
            "texts_total": self.texts_total,
            "texts_embedded": self.texts_embedded,
            "is_embedding": self.is_embedding,
            "progress_done": self.progress_counts[0],
            "progress_total": self.progress_counts[1],
            "metrics": self.metrics,
            "loss_curve": self.loss_curve,
            "validation_curve": self.validation_curve,
            "best_epoch": self.best_epoch,
            "patience": self.patience,
            "adopted": self.adopted,
            "keyword_weight": self.keyword_weight,
            "verdict": self.verdict,
        }

    # Cleanup: no status gives a run's folder away. A generated run waits for review, a failed or
    # stopped one for Proceed (which continues from its checkpoint and cached embeddings), and a
    # completed one's adapter and index serve search. Only a removed run's files are garbage
    # (`live()` says which those are).
    OUTPUT_REUSABLE = frozenset()
    OUTPUT_DEAD = frozenset()


def _moved(after: dict, before: dict, k: int) -> str:
    """"0.82 → 0.84": recall@k of the encoder alone, then of the adapter."""
    return f"{before.get(f'recall@{k}', 0):.2f} → {after.get(f'recall@{k}', 0):.2f}"


class TrainingPair(models.Model):
    class Review(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="pairs")
    chunk = models.ForeignKey(Chunk, on_delete=models.CASCADE, related_name="pairs")
    query = models.TextField()
    review = models.CharField(max_length=10, choices=Review.choices, default=Review.PENDING, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "chunk__index", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(review__in=["pending", "approved", "rejected"]), name="pair_review_valid"),
            # A chunk's pairs are written once per run: a resumed generation never duplicates them.
            models.UniqueConstraint(fields=["run", "chunk", "query"], name="pair_unique_per_run"),
        ]

    def __str__(self):
        return self.query[:80]
