from django.db import models
from django.utils import timezone

from jobsite.errors import RETRYABLE, ErrorType, error_label, next_step


class Event(models.Model):
    """The durable event log: every state change and progress report of every job.

    `seq` orders everything; a client that saw seq N asks for the events after N and
    misses nothing, whichever process wrote them.
    """

    seq = models.BigAutoField(primary_key=True)
    # "<kind>.<id>" (e.g. "extraction.12"); clients filter by prefix.
    topic = models.CharField(max_length=100, db_index=True)
    type = models.CharField(max_length=64)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["seq"]

    def __str__(self):
        return f"#{self.seq} {self.type} {self.topic}"

    def as_message(self) -> dict:
        return {
            "seq": self.seq,
            "topic": self.topic,
            "type": self.type,
            "payload": self.payload,
            "created_at": self.created_at.isoformat(),
        }


def silent_too_long(heartbeat_age_s: float | None) -> bool:
    """Whether a running job's heartbeat this old means its worker is gone (JOBSITE_STALL_AFTER_S)."""
    from django.conf import settings

    return heartbeat_age_s is not None and heartbeat_age_s > settings.JOBSITE_STALL_AFTER_S


class Job(models.Model):
    """Lifecycle, heartbeat, attempt and failure fields shared by every job kind.

    A concrete job declares its `Status`, the allowed `TRANSITIONS`, which statuses are
    `RUNNING` (a worker owns the job and must heartbeat), `ACTIVE` and `TERMINAL`, the status
    a claim moves to (`CLAIMED`), its event `KIND` and its django-q2 `TASK` path.
    """

    KIND: str = ""
    TASK: str = ""
    # The status a claim moves to; empty for kinds whose phase status stays while a worker
    # holds them (the `worker` field is then the compare-and-set lock).
    CLAIMED: str = ""
    # Transient failures (WORKER_LOST, TIMEOUT) are retried by the machinery itself; kinds
    # whose failures wait for a person (a "proceed") turn this off.
    AUTO_RETRY: bool = True
    TRANSITIONS: dict = {}
    RUNNING: frozenset = frozenset()
    ACTIVE: frozenset = frozenset()
    TERMINAL: frozenset = frozenset()

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)
    queued_at = models.DateTimeField(default=timezone.now)
    # Claims given back by a worker that stopped (a deploy): not attempts, but the counters then
    # include earlier work, as a resumed attempt's do.
    releases = models.PositiveIntegerField(default=0)
    # Set once the task reached the broker; a queued job without it after a while lost its
    # enqueue (the process died between commit and hand-off) and the watchdog sends it again.
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Incremented by every heartbeat: a page can tell a live worker from a frozen row.
    heartbeat_seq = models.PositiveBigIntegerField(default=0)
    # Last time the workload itself reported progress (the heartbeat only proves the process lives).
    progress_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Claims so far; automatic retries stop at JOBSITE_MAX_ATTEMPTS.
    attempt = models.PositiveIntegerField(default=0)
    # An automatic retry is not claimed before this time (backoff with jitter).
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="host:pid of the process that claimed the job")
    worker_host = models.CharField(max_length=200, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    error_type = models.CharField(max_length=20, blank=True, choices=ErrorType.CHOICES)
    error_message = models.TextField(blank=True)
    suggested_retry_params = models.JSONField(default=dict, blank=True)
    # True once the machinery has resumed this job by itself after a transient failure.
    auto_retried = models.BooleanField(default=False)

    class Meta:
        abstract = True

    @property
    def topic(self) -> str:
        return f"{self.KIND}.{self.pk}"

    @property
    def is_running(self) -> bool:
        return self.status in self.RUNNING

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def cancel_available(self) -> bool:
        return self.status in self.ACTIVE and not self.cancel_requested

    @property
    def retry_available(self) -> bool:
        return self.status in self.RETRYABLE_FROM

    RETRYABLE_FROM: frozenset = frozenset()

    def cancelled_outcome(self) -> tuple[str, dict]:
        """The status (and fields) a cancellation ends in; kinds without a cancelled status
        end in a failed one that says it was stopped on request. An error kept from an earlier
        attempt (a lost worker, an OOM retried) is not why it ended: it goes."""
        return self.CANCELLED, {"error_type": "", "error_message": "", "suggested_retry_params": {}}

    @property
    def next_step(self) -> str:
        """What a person should do about the last failure (empty when there is none). A failure
        retried automatically that ended the job anyway has used up its attempts: "retried
        automatically" would promise what no longer comes."""
        if self.error_type in RETRYABLE and self.status not in self.ACTIVE:
            label = self._meta.verbose_name
            return (f"Its automatic attempts are used up (attempt {self.attempt}); Retry starts a new {label}, which "
                    "keeps the samples already done.")
        return next_step(self.error_type)

    @classmethod
    def live(cls) -> models.Q:
        """Rows the machinery may still act on; a kind that keeps removed jobs as history excludes them."""
        return models.Q()

    @classmethod
    def awaiting_worker(cls) -> models.Q:
        """Rows a worker may claim: queued ones, or unowned phases for CLAIMED-less kinds."""
        if cls.CLAIMED:
            return models.Q(status=cls.QUEUED) & cls.live()
        return models.Q(status__in=cls.RUNNING, worker="") & cls.live()

    @property
    def is_claimable(self) -> bool:
        return type(self).objects.filter(type(self).awaiting_worker(), pk=self.pk).exists()

    def failed_status(self) -> str:
        """Where a failure in the current status leads; phase-specific kinds override."""
        return self.FAILED

    def resume_status(self) -> str:
        """Where a failed job goes to be picked up again (automatic retry, resume, proceed)."""
        return self.QUEUED

    @property
    def error_label(self) -> str:
        return error_label(self.error_type)

    @property
    def heartbeat_age_s(self) -> float | None:
        beat = self.heartbeat_at or self.started_at
        if not beat or self.status not in self.RUNNING or not self.worker:
            return None
        return (timezone.now() - beat).total_seconds()

    @property
    def is_stalled(self) -> bool:
        """Running, but its worker has been silent past JOBSITE_STALL_AFTER_S."""
        return silent_too_long(self.heartbeat_age_s)

    def event_payload(self) -> dict:
        """The job as its events carry it: enough for a client to redraw it from scratch."""
        return {
            "id": self.pk,
            "kind": self.KIND,
            "status": self.status,
            "attempt": self.attempt,
            "heartbeat_at": self.heartbeat_at.isoformat() if self.heartbeat_at else None,
            "heartbeat_seq": self.heartbeat_seq,
            "cancel_requested": self.cancel_requested,
            "error_type": self.error_type,
            "error_label": self.error_label,
            "error_message": self.error_message,
            "suggested_retry_params": self.suggested_retry_params,
            "next_step": self.next_step,
            "retry_available": self.retry_available,
            "cancel_available": self.cancel_available,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
        }

    def suggest_retry_params(self, error_type: str) -> dict:
        """Parameters a retry should change for this failure; kinds override."""
        return {}

    # -- jobs made of parts (an extraction run as shards), and parts a worker may not run -----
    def parts(self) -> list["Job"]:
        """The jobs this one is made of, each claimed and run by a worker of its own; [] for a
        job a worker runs itself."""
        return []

    def refusal_here(self) -> str:
        """Why this worker cannot run the job (it does not see the job's files, say), as a
        sentence; "" when it can. Asked before the claim."""
        return ""

    def leave_here(self, reason: str) -> None:
        """This worker leaves the job for another, for `reason` (refusal_here's)."""

    def after_attempt(self) -> None:
        """Called by the worker once an attempt is recorded, whatever its end: a part tells its whole."""

    @classmethod
    def watch(cls) -> list[str]:
        """A watchdog pass's own work for this kind; a line per job it changed."""
        return []

    # What cleanup (jobsite/cleanup.py) may do with a job's output folder, said by its status.
    # A status in neither set keeps its folder: the job works on it (ACTIVE), it is the result,
    # or a person's next step (a review, a Proceed) needs it. A kind that says nothing loses nothing.
    # Failed or stopped statuses whose output a Retry starts from: listed apart, removed only when asked.
    OUTPUT_REUSABLE: frozenset = frozenset()
    # Statuses whose output nobody needs any more.
    OUTPUT_DEAD: frozenset = frozenset()
    # What the reusable output is counted in ("samples").
    OUTPUT_UNIT: str = ""

    @classmethod
    def outputs_root(cls):
        """The folder that holds one output folder per job, named by its id (where `output_dir`
        puts them); None for a kind that writes no files."""
        if not hasattr(cls, "output_dir"):
            return None
        return cls(pk=0).output_dir.parent

    def output_reuse(self) -> tuple[int, int] | None:
        """(done, total) of what a Retry of this job would start from in its output folder, in
        OUTPUT_UNIT; None when nothing there can be reused. Kinds with resumable output override."""
        return None

    def output_use(self) -> tuple[str, str]:
        """What cleanup may do with this job's output folder, and why, as (use, reason): use is
        "active" (a worker has it or will), "needed", "reusable" or "garbage"."""
        # A kind may say its status as a sentence does ("has a failed training", "is stopped").
        name = f"{self._meta.verbose_name} {self.pk} " + (getattr(self, "state_phrase", "") or f"is {self.status}")
        if self.status in self.ACTIVE:
            return "active", name
        if self.status in self.OUTPUT_REUSABLE:
            reuse = self.output_reuse()
            if reuse:
                done, total = reuse
                return "reusable", f"{name}; reusable by Retry: {done:,} of {total:,} {self.OUTPUT_UNIT}"
            return "garbage", f"{name}; a Retry has nothing in it to reuse"
        if self.status in self.OUTPUT_DEAD:
            return "garbage", name
        return "needed", name


class ApiToken(models.Model):
    """A personal API token: sent as `Authorization: Bearer <key>`, it acts as its user, with
    that user's permissions. Only a hash of the key is stored; the key is shown once, when made."""

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="what the token is for, e.g. 'nightly export script'")
    # The key's first characters, shown in lists so that a person can tell their tokens apart.
    prefix = models.CharField(max_length=12, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self):
        return f"{self.prefix}… ({self.name}, {self.user})"
