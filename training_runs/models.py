from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q, Value
from django.db.models.functions import Lower

from jobsite.errors import ErrorType
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
    empty), and a failure waits for a person to proceed or remove it (AUTO_RETRY is off).
    """

    Status = TrainingRunStatus

    class Generator(models.TextChoices):
        LOCAL = "local", "Deterministic local generator (CPU, offline)"
        CAUSAL_LM = "causal_lm", "Causal language model (transformers generate)"

    KIND = "training"
    TASK = "training_runs.tasks.run_training_phase"
    CLAIMED = ""
    AUTO_RETRY = False
    RUNNING = frozenset({Status.GENERATING, Status.TRAINING})
    ACTIVE = RUNNING
    TERMINAL = frozenset({Status.COMPLETED})
    RETRYABLE_FROM = frozenset({Status.GENERATING_FAILED, Status.TRAINING_FAILED})
    # A run waiting for review can be discarded too: nothing works on it, and it blocks new generations.
    REMOVABLE = RETRYABLE_FROM | {Status.GENERATED}
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
    epochs_done = models.PositiveIntegerField(default=0)
    # The training phase embeds every chunk and approved query before its first epoch; these
    # count those texts and how many are embedded (batches kept from an earlier attempt included).
    texts_total = models.PositiveIntegerField(default=0)
    texts_embedded = models.PositiveIntegerField(default=0)
    # {"before": {"recall@1": .., ...}, "after": {...}, "train_pairs": n, "eval_pairs": n}; partial while training.
    metrics = models.JSONField(default=dict, blank=True)
    loss_curve = models.JSONField(default=list, blank=True, help_text="mean training loss per epoch")
    generating_started_at = models.DateTimeField(null=True, blank=True)
    generated_at = models.DateTimeField(null=True, blank=True)
    training_started_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=TrainingRunStatus.values), name="training_run_status_valid"),
            models.CheckConstraint(
                condition=Q(status="completed", finished_at__isnull=False)
                | (~Q(status="completed") & Q(finished_at__isnull=True)),
                name="training_run_finished_at_iff_completed",
            ),
            # At most one run that is not completed, whoever asks and however concurrently.
            models.UniqueConstraint(Value(1), condition=~Q(status="completed"), name="training_run_one_open"),
        ]

    def __str__(self):
        return f"Training run {self.pk} ({self.status})"

    @property
    def output_dir(self) -> Path:
        return settings.JOBSITE_DATA_DIR / "training_runs" / str(self.pk)

    @property
    def status_label(self) -> str:
        """What the pages call the status: a run stopped on request is "stopped" (it is kept in a
        *_failed status with CANCELLED, since the design has no stopped status), not failed."""
        if self.status in self.RETRYABLE_FROM and self.error_type == ErrorType.CANCELLED:
            return "stopped"
        return self.status

    @property
    def state_phrase(self) -> str:
        """The status as a sentence says it: "training run 8 has a failed generation"."""
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
            return f"Embedding {self.embedding_label}"
        if self.status in (self.Status.TRAINING, self.Status.TRAINING_FAILED):
            return self.epochs_label
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
    def review_note(self) -> str:
        """What a review's answer adds for a failed training: what Proceed will now do."""
        return f" Proceed: {self.proceed_sentence}." if self.status == self.Status.TRAINING_FAILED else ""

    # A failed run waits for a person: Proceed resumes it where it stopped, Remove discards it.
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
        if not self.error_type:
            return ""
        return self.NEXT_STEPS.get(self.error_type, "Proceed resumes the run where it stopped; Delete discards it.")

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

    def event_payload(self) -> dict:
        return {
            **super().event_payload(),
            "corpus_id": self.corpus_id,
            "total_chunks": self.total_chunks,
            "processed_chunks": self.processed_chunks,
            "pair_count": self.pair_count,
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
        }


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
