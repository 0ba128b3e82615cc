import json
from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.timesince import timesince

from extraction.constants import VALID_BATCH_SIZES
from jobsite.errors import ErrorType
from jobsite.models import Job


class ModelRecord(models.Model):
    """A local `save_pretrained` directory under JOBSITE_MODEL_ROOTS, checked when registered."""

    name = models.CharField(max_length=200, unique=True)
    path = models.CharField(max_length=1000, unique=True)
    architecture = models.CharField(max_length=200)
    model_type = models.CharField(max_length=100)
    num_layers = models.PositiveIntegerField()
    hidden_size = models.PositiveIntegerField()
    vocab_size = models.PositiveIntegerField()
    supported_hooks = models.JSONField(default=list)
    # The family adapter its hook points come from; empty: a family jobsite does not know (or
    # registered before jobsite kept it, when hook_points is empty too).
    family = models.CharField(max_length=50, blank=True)
    # {hook: {definition, width, transformerlens}} of the hook points offered; {}: not read yet.
    hook_points = models.JSONField(default=dict)
    # {hook: why it is not offered}, said when a start asks for one.
    hook_refusals = models.JSONField(default=dict)
    # The most tokens a sample may have (config max_position_embeddings): a longer max length is
    # refused at start. Null: registered before jobsite kept it; 0: the config names no limit.
    max_positions = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self):
        return self.name


class Dataset(models.Model):
    """Text samples: `.txt` one per line, or `.jsonl` with `text` or `input_ids`."""

    class Format(models.TextChoices):
        TXT = "txt", "Text, one sample a line"
        JSONL = "jsonl", "JSON lines"

    name = models.CharField(max_length=200, unique=True)
    path = models.CharField(max_length=1000, unique=True)
    format = models.CharField(max_length=10, choices=Format.choices)
    num_samples = models.PositiveIntegerField()
    size_bytes = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


# A sharded job's plan in its output folder (extraction/runner/shards.py), read here without torch.
SHARD_LAYOUT = "shards.json"


class ExtractionStatus(models.TextChoices):
    QUEUED = "queued"
    LOADING = "loading"
    EXTRACTING = "extracting"
    SAVING = "saving"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_TERMINAL = ["completed", "failed", "cancelled"]
_ACTIVE = ["queued", "loading", "extracting", "saving"]


class Extraction(Job):
    Status = ExtractionStatus

    class StorageDtype(models.TextChoices):
        FLOAT32 = "float32"
        FLOAT16 = "float16"

    KIND = "extraction"
    TASK = "extraction.tasks.run_extraction"
    QUEUED = Status.QUEUED
    CLAIMED = Status.LOADING
    FAILED = Status.FAILED
    CANCELLED = Status.CANCELLED
    RUNNING = frozenset({Status.LOADING, Status.EXTRACTING, Status.SAVING})
    ACTIVE = frozenset(_ACTIVE)
    TERMINAL = frozenset(_TERMINAL)
    RETRYABLE_FROM = frozenset({Status.FAILED, Status.CANCELLED})
    TRANSITIONS = {
        Status.QUEUED: {Status.LOADING, Status.CANCELLED, Status.FAILED},
        Status.LOADING: {Status.EXTRACTING, Status.FAILED, Status.CANCELLED},
        Status.EXTRACTING: {Status.SAVING, Status.FAILED, Status.CANCELLED},
        Status.SAVING: {Status.COMPLETED, Status.FAILED, Status.CANCELLED},
        # An automatic retry resumes the same row from its checkpoint.
        Status.FAILED: {Status.QUEUED},
        Status.COMPLETED: set(),
        Status.CANCELLED: set(),
    }

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    model = models.ForeignKey(ModelRecord, on_delete=models.PROTECT, related_name="extractions")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="extractions")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    layers = models.JSONField(help_text="block indices, e.g. [0, 3]")
    hooks = models.JSONField(help_text="hook points: residual, mlp, attention, resid_pre, resid_mid, mlp_hidden")
    batch_size = models.PositiveIntegerField(default=8)
    max_samples = models.PositiveIntegerField(null=True, blank=True)
    max_length = models.PositiveIntegerField(default=512)
    storage_dtype = models.CharField(max_length=10, choices=StorageDtype.choices, default=StorageDtype.FLOAT32)
    auto_retry_on_oom = models.BooleanField(default=False)
    # Parts of the global order run by as many workers at once, each an ExtractionShard; 1: one
    # worker runs it all. Not in the fingerprint: the output is the same bytes whatever the count.
    shards = models.PositiveIntegerField(default=1)
    # {host: why its workers do not take this job} (no shared data directory, no model files).
    refusals = models.JSONField(default=dict, blank=True)
    # The first refusal while no worker had taken it since (see ExtractionShard.refused_since).
    refused_since = models.DateTimeField(null=True, blank=True)
    # sha256 of what determines the output (not batch size): an identical active request is this job.
    fingerprint = models.CharField(max_length=64, db_index=True)

    samples_processed = models.PositiveIntegerField(default=0)
    total_samples = models.PositiveIntegerField(default=0)
    tokens_processed = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    # Token ids outside the model's vocabulary, replaced by the nearest valid id.
    clamped_tokens = models.PositiveBigIntegerField(default=0)
    truncated_samples = models.PositiveIntegerField(default=0)
    # float16 files only: values beyond float16's range (+-65504), stored as +-inf.
    inf_values = models.PositiveBigIntegerField(default=0)
    # The batch size in force: smaller than batch_size after out-of-memory halving.
    current_batch_size = models.PositiveIntegerField(null=True, blank=True)

    # Deleting an original keeps its number here (no database constraint, nothing cascades): a
    # retry still says what it retried (reading `original_extraction` then raises DoesNotExist:
    # look the original up by its id).
    original_extraction = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="retries",
        help_text="the extraction this one retries",
    )
    retry_count = models.PositiveIntegerField(default=0, help_text="position in its retry lineage")
    retry_reason = models.CharField(max_length=500, blank=True)
    # Samples copied from the original's checkpoint when a retry changed only the batch size.
    resumed_samples = models.PositiveIntegerField(default=0)
    # Every change of the batch size in force, oldest first: {"at_sample", "from", "to", "why"}
    # with why "out_of_memory" (halved) or "grew_back" (shorter samples fit the larger size again).
    batch_size_changes = models.JSONField(default=list, blank=True)
    # A failed or cancelled job moved out of "Active and needing attention" into the history.
    dismissed_at = models.DateTimeField(null=True, blank=True)
    dismissed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [
            ("cancel_extraction", "Can cancel extraction"),
            ("retry_extraction", "Can retry extraction"),
            ("resume_extraction", "Can resume extraction"),
            ("dismiss_extraction", "Can dismiss extraction"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=ExtractionStatus.values), name="extraction_status_valid"),
            models.CheckConstraint(
                condition=Q(status__in=_TERMINAL, finished_at__isnull=False)
                | (~Q(status__in=_TERMINAL) & Q(finished_at__isnull=True)),
                name="extraction_finished_at_iff_terminal",
            ),
            models.CheckConstraint(condition=Q(batch_size__in=VALID_BATCH_SIZES), name="extraction_batch_size_valid"),
            models.CheckConstraint(condition=Q(shards__gte=1), name="extraction_shards_at_least_one"),
            models.UniqueConstraint(
                fields=["model", "fingerprint"],
                condition=Q(status__in=_ACTIVE),
                name="extraction_one_active_per_request",
            ),
        ]

    def __str__(self):
        return f"Extraction {self.pk} ({self.status})"

    @property
    def output_dir(self) -> Path:
        return settings.JOBSITE_DATA_DIR / "activations" / str(self.pk)

    @property
    def percent(self) -> float:
        return 100.0 * self.samples_processed / self.total_samples if self.total_samples else 0.0

    def identical_sentence(self, *, batch_size: int | None = None, auto_retry_on_oom: bool | None = None) -> str:
        """Who already asked for what a new request asks, and where it stands: a second person
        (or a second tab) learns whose job it joins, not only its number, and which of the
        settings it asked for (those that do not change the output) the job does not have."""
        age = (timezone.now() - self.created_at).total_seconds()
        when = "just now" if age < 60 else f"{timesince(self.created_at).replace(chr(0xA0), ' ')} ago"
        who = f" by {self.created_by.get_username()}" if self.created_by_id else ""
        sentence = (f"Extraction {self.pk}, started{who} {when}, already extracts the same dataset, layers, hooks and "
                    f"limits with {self.model.name}: it is {self.status} ({self.samples_processed:,}/"
                    f"{self.total_samples:,} samples).")
        unlike = []
        if batch_size is not None and batch_size != self.batch_size:
            unlike.append(f"batch size {self.batch_size}, not {batch_size}")
        if auto_retry_on_oom is not None and auto_retry_on_oom != self.auto_retry_on_oom:
            on_off = {True: "on", False: "off"}
            unlike.append(f"auto retry on OOM {on_off[self.auto_retry_on_oom]}, not {on_off[auto_retry_on_oom]}")
        return sentence + (f" It keeps its {' and '.join(unlike)}." if unlike else "")

    def suggest_retry_params(self, error_type: str) -> dict:
        size = self.current_batch_size or self.batch_size
        if error_type == ErrorType.OOM:
            if size > 1:
                return {"batch_size": max(1, size // 2)}
            return {"batch_size": 1, "max_length": max(1, self.max_length // 2)}
        # Queued before starts were checked against the model's position limit: the runner refused it.
        limit = self.model.max_positions if error_type == ErrorType.VALIDATION else None
        if limit and self.max_length > limit:
            return {"max_length": limit}
        return {}

    def event_payload(self) -> dict:
        parts = self.parts()  # read once: the list and the heartbeat both come from them
        beat = self.oldest_shard_beat(parts) if self.sharded else None
        return {
            **super().event_payload(),
            "model_id": self.model_id,
            "dataset_id": self.dataset_id,
            "batch_size": self.batch_size,
            "current_batch_size": self.current_batch_size,
            "batch_size_changes": self.batch_size_changes,
            "samples_processed": self.samples_processed,
            "total_samples": self.total_samples,
            "tokens_processed": self.tokens_processed,
            "total_tokens": self.total_tokens,
            "clamped_tokens": self.clamped_tokens,
            "truncated_samples": self.truncated_samples,
            "inf_values": self.inf_values,
            "original_extraction_id": self.original_extraction_id,
            "retry_count": self.retry_count,
            "shard_count": self.shards,
            "shards": self.shard_list(parts),
            # A job its shards run: its most silent running shard's heartbeat, as the page judges stalls.
            **({"heartbeat_at": beat and beat.isoformat()} if self.sharded else {}),
        }

    def oldest_shard_beat(self, shards: list["ExtractionShard"] | None = None):
        """When the most silent of its running shards last spoke (`shards`: its parts, when the
        caller has them already); None while none runs."""
        beats = [shard.heartbeat_at or shard.started_at for shard in (self.parts() if shards is None else shards)
                 if shard.status in shard.RUNNING and shard.worker and (shard.heartbeat_at or shard.started_at)]
        return min(beats) if beats else None

    @property
    def shard_set(self):
        """The shards of the phase it is in: the tokenizing parts while it tokenizes in parts, then
        the extracting shards."""
        phase = ExtractionShard.Phase.TOKENIZE
        if self.status != self.Status.LOADING and self.part_set.filter(phase=ExtractionShard.Phase.EXTRACT).exists():
            phase = ExtractionShard.Phase.EXTRACT
        return self.part_set.filter(phase=phase)

    def parts(self) -> list["ExtractionShard"]:
        return list(self.shard_set.all()) if self.pk and self.shards > 1 else []

    @property
    def sharded(self) -> bool:
        """Run by its shards (or tokenized by its parts): no worker holds the extraction itself."""
        return self.shards > 1 and self.status in (self.Status.LOADING, self.Status.EXTRACTING,
                                                   self.Status.SAVING) and not self.worker

    @property
    def heartbeat_age_s(self) -> float | None:
        """A sharded job's: its most silent running shard's."""
        return self.heartbeat_age_with(None)

    def heartbeat_age_with(self, shards: list["ExtractionShard"] | None) -> float | None:
        """heartbeat_age_s, from its parts when the caller has them already (`shards`)."""
        if not self.sharded:
            return super().heartbeat_age_s
        beat = self.oldest_shard_beat(shards)
        return None if beat is None else (timezone.now() - beat).total_seconds()

    def refusal_here(self) -> str:
        """A sharded job is planned only by a worker that sees the folder its start made on the
        shared data directory: a plan written anywhere else would be seen by no other worker."""
        if self.shards <= 1:
            return ""
        from extraction.services import extraction_refusal  # noqa: PLC0415

        return extraction_refusal(extraction=self, planned=False)

    def leave_here(self, reason: str) -> None:
        from extraction.services import extraction_leave  # noqa: PLC0415

        extraction_leave(job=self, reason=reason)

    def shard_list(self, shards: list["ExtractionShard"] | None = None) -> list[dict]:
        """Each shard's progress, worker, heartbeat and attempt (`shards`: its parts, when the
        caller has them already); [] for a job one worker runs."""
        return [shard.describe() for shard in (self.parts() if shards is None else shards)]

    # Cleanup: a failed or cancelled extraction's finished samples are where its Retry starts.
    OUTPUT_REUSABLE = RETRYABLE_FROM
    OUTPUT_UNIT = "samples"
    # Where a Retry starts once nothing of its original is left to start from.
    FIRST_SAMPLE = "starts from the first sample"

    def reusable_samples(self, *, sharded: bool | None = None) -> int:
        """Finished samples a Retry can start from: what the checkpoint in the output folder
        counts (each shard's, for a sharded job); 0 once the folder is gone (cleanup removed it, say).
        `sharded`: the retry's kind; a sharded retry starts only from shards, a one-worker retry
        only from a one-worker checkpoint."""
        from extraction.reader import CHECKPOINT  # noqa: PLC0415

        try:
            layout = json.loads((self.output_dir / SHARD_LAYOUT).read_text())
        except (OSError, ValueError):
            layout = None
        if sharded is not None and sharded != isinstance(layout, dict):
            return 0
        try:
            if isinstance(layout, dict):
                done = 0
                for part in layout["shards"]:
                    try:
                        checkpoint = json.loads((self.output_dir / "shards" / f"{part['index']}.json").read_text())
                    except (OSError, ValueError):
                        continue
                    done += max(0, int(checkpoint.get("samples_done") or 0) - int(part["first_sample"]))
                return done
            return max(0, int(json.loads((self.output_dir / CHECKPOINT).read_text()).get("samples_done") or 0))
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            return 0

    def output_reuse(self) -> tuple[int, int] | None:
        done = self.reusable_samples()
        return (done, max(done, self.total_samples)) if done else None

    def output_use(self) -> tuple[str, str]:
        """A retry that has not copied the finished samples yet still reads them; a retry that
        completed the same request leaves nothing for another to do."""
        use, reason = super().output_use()
        if use not in ("reusable", "garbage") or self.status not in self.RETRYABLE_FROM:
            return use, reason
        name = f"extraction {self.pk} is {self.status}"
        copying = self.retries.filter(status__in=(self.Status.QUEUED, self.Status.LOADING)).order_by("pk").first()
        if copying is not None:
            return "needed", f"{name}; its retry, extraction {copying.pk}, starts from these files"
        done = self.retries.filter(status=self.Status.COMPLETED, fingerprint=self.fingerprint).order_by("pk").first()
        if done is not None:
            return "garbage", f"{name}; its retry, extraction {done.pk}, completed the same request"
        return use, reason

    @property
    def next_step(self) -> str:
        """Once nothing of a failed or cancelled extraction's samples is left (cleanup removed its
        files), a Retry starts from the first sample and says so, instead of promising them."""
        step = super().next_step
        if self.status not in self.RETRYABLE_FROM or not self.samples_processed or self.reusable_samples():
            return step
        for promise in (", which keeps the samples already done.", ": completed work is kept."):
            step = step.replace(promise, ".")
        return f"{step} A Retry {self.FIRST_SAMPLE}: none of its samples are left to reuse.".strip()


class ExtractionShardStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_SHARD_TERMINAL = ["completed", "failed", "cancelled"]


class ExtractionShard(Job):
    """One contiguous range of an extraction's global order (longest first), run by one worker
    into the extraction's one set of preallocated files, at its own rows. It is a job of its
    own: claim, lease, heartbeat, checkpoint, attempts, automatic retry and out-of-memory
    halving are its own; the extraction (its parent) sums their progress and takes its status
    from theirs (services.extraction_settle). Its events go on the extraction's topic, with the
    extraction as their payload, so every page that follows the extraction hears its shards."""

    Status = ExtractionShardStatus

    KIND = "extraction_shard"
    TASK = "extraction.tasks.run_extraction_shard"
    QUEUED = Status.QUEUED
    CLAIMED = Status.RUNNING
    FAILED = Status.FAILED
    CANCELLED = Status.CANCELLED
    RUNNING = frozenset({Status.RUNNING})
    ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})
    TERMINAL = frozenset(_SHARD_TERMINAL)
    TRANSITIONS = {
        Status.QUEUED: {Status.RUNNING, Status.CANCELLED, Status.FAILED},
        Status.RUNNING: {Status.COMPLETED, Status.FAILED, Status.CANCELLED},
        Status.FAILED: {Status.QUEUED},  # an automatic retry or a Resume goes on from its checkpoint
        Status.COMPLETED: set(),
        Status.CANCELLED: set(),
    }

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    class Phase(models.TextChoices):
        # A part of the dataset's lines tokenized, before the plan is cut (large datasets only).
        TOKENIZE = "tokenize"
        # A range of the global order extracted.
        EXTRACT = "extract"

    extraction = models.ForeignKey(Extraction, on_delete=models.CASCADE, related_name="part_set")
    phase = models.CharField(max_length=10, choices=Phase.choices, default=Phase.EXTRACT)
    index = models.PositiveIntegerField(help_text="its place among the extraction's shards, from 0")
    # A tokenizing part's lines: {"start_byte", "end_byte", "first_line"} (first_sample/end_sample
    # then count samples in dataset order).
    # Its range of the global order, longest first: positions first_sample <= p < end_sample.
    first_sample = models.PositiveIntegerField()
    end_sample = models.PositiveIntegerField()
    total_tokens = models.PositiveBigIntegerField(default=0)
    samples_processed = models.PositiveIntegerField(default=0)
    tokens_processed = models.PositiveBigIntegerField(default=0)
    current_batch_size = models.PositiveIntegerField(null=True, blank=True)
    batch_size_changes = models.JSONField(default=list, blank=True)
    inf_values = models.PositiveBigIntegerField(default=0)
    # {host: why its workers do not take this shard} (no shared data directory, no model files).
    refusals = models.JSONField(default=dict, blank=True)
    # The first refusal while no worker had taken it since: past the stall limit with no worker
    # able to take it, the shard fails with the refusal's sentence.
    refused_since = models.DateTimeField(null=True, blank=True)
    source = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["extraction_id", "phase", "index"]
        verbose_name = "extraction shard"
        constraints = [
            models.CheckConstraint(condition=Q(status__in=ExtractionShardStatus.values), name="shard_status_valid"),
            models.CheckConstraint(
                condition=Q(status__in=_SHARD_TERMINAL, finished_at__isnull=False)
                | (~Q(status__in=_SHARD_TERMINAL) & Q(finished_at__isnull=True)),
                name="shard_finished_at_iff_terminal",
            ),
            models.UniqueConstraint(fields=["extraction", "phase", "index"], name="shard_index_unique"),
        ]

    def __str__(self):
        return f"Shard {self.index} of extraction {self.extraction_id} ({self.status})"

    @property
    def topic(self) -> str:
        return f"extraction.{self.extraction_id}"

    @classmethod
    def awaiting_worker(cls) -> Q:
        """A queued shard of an extraction that no longer runs (failed, cancelled) is never taken."""
        return super().awaiting_worker() & Q(extraction__status__in=[Extraction.Status.LOADING,
                                                                     Extraction.Status.EXTRACTING])

    @property
    def total_samples(self) -> int:
        return self.end_sample - self.first_sample

    @property
    def percent(self) -> float:
        return 100.0 * self.samples_processed / self.total_samples if self.total_samples else 100.0

    def describe(self) -> dict:
        """The shard as the extraction's payload lists it: enough to tell a slow or stalled host."""
        return {
            "index": self.index, "phase": self.phase, "status": self.status, "samples_processed": self.samples_processed,
            "total_samples": self.total_samples, "tokens_processed": self.tokens_processed,
            "total_tokens": self.total_tokens, "worker": self.worker, "attempt": self.attempt,
            "heartbeat_at": self.heartbeat_at.isoformat() if self.heartbeat_at else None,
            "heartbeat_age_s": None if self.heartbeat_age_s is None else round(self.heartbeat_age_s, 1),
            "stalled": self.is_stalled, "current_batch_size": self.current_batch_size,
            "error_type": self.error_type, "error_message": self.error_message,
            "refusals": self.refusals,
        }

    def event_payload(self) -> dict:
        """The extraction, as it stands with this shard's news, and the shard itself."""
        parent = Extraction.objects.get(pk=self.extraction_id)
        return {**parent.event_payload(), "shard": {**super().event_payload(), **self.describe()}}

    def refusal_here(self) -> str:
        from extraction.services import extraction_refusal  # noqa: PLC0415

        return extraction_refusal(extraction=self.extraction, planned=self.phase == self.Phase.EXTRACT)

    def leave_here(self, reason: str) -> None:
        from extraction.services import extraction_leave  # noqa: PLC0415

        extraction_leave(job=self, reason=reason)

    def after_attempt(self) -> None:
        from extraction.services import extraction_settle  # noqa: PLC0415

        extraction_settle(extraction_id=self.extraction_id)

    @classmethod
    def watch(cls) -> list[str]:
        from extraction.services import extraction_settle_all  # noqa: PLC0415

        return extraction_settle_all()
