"""Failure classification shared by every job kind.

Pure Python (torch optional): runners import it, so it must not import Django.
"""

from __future__ import annotations

import errno
import re


def counted(count: int, noun: str) -> str:
    """"1 chunk", "1,113 chunks": a count as a sentence says it."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class ErrorType:
    OOM = "OOM"
    VALIDATION = "VALIDATION"
    TIMEOUT = "TIMEOUT"
    EXTRACTION = "EXTRACTION"
    TRAINING = "TRAINING"
    STORAGE = "STORAGE"
    DATABASE = "DATABASE"
    WORKER_LOST = "WORKER_LOST"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    CHOICES = [
        (OOM, "Out of memory"),
        (VALIDATION, "Invalid input"),
        (TIMEOUT, "Timed out"),
        (EXTRACTION, "Extraction error"),
        (TRAINING, "Training error"),
        (STORAGE, "Storage error"),
        (DATABASE, "Database unavailable"),
        (WORKER_LOST, "Worker lost"),
        (CANCELLED, "Stopped on request"),
        (UNKNOWN, "Unknown error"),
    ]


# What every page, the admin, the commands and the API call an error type: words, not its code.
LABELS = dict(ErrorType.CHOICES)


def error_label(error_type: str) -> str:
    return LABELS.get(error_type, error_type) if error_type else ""


# Transient by nature: the same job, resumed from its checkpoint, may well succeed.
RETRYABLE = frozenset({ErrorType.WORKER_LOST, ErrorType.TIMEOUT, ErrorType.DATABASE})

# The allocator messages accelerate's find_executable_batch_size recognises, plus MPS.
_OOM_MESSAGES = (
    " out of memory.",
    "CUDA out of memory",
    "CUDA error: out of memory",  # a cudaMalloc outside the caching allocator (lazy module load, cuBLAS workspace)
    "DefaultCPUAllocator: can't allocate memory",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "MPS backend out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


class JobInputError(ValueError):
    """The job's parameters or inputs are wrong; retrying unchanged cannot help.

    `field` names the input the sentence is about, by its API name ("batch_size", "path"),
    where it is about one: the API answers it beside the message, and a page form shows the
    sentence under that field."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_text(value: str, label: str, limit: int, *, field: str | None = None) -> str:
    """A user's text as the database will hold it, or a sentence saying why it cannot be."""
    if "\x00" in value:
        raise JobInputError(f"{label} contains a NUL character; remove it.", field=field)
    if len(value) > limit:
        raise JobInputError(f"{label} is {len(value):,} characters long; the most is {limit:,}.", field=field)
    return value


_PART = r"[^\W_][\w.-]*"  # a letter or digit first, since "." and ".." would name the folder above


def check_file_name(name: str, label: str, *, field: str = "name") -> str:
    """A name that also names a file or folder in the data directory."""
    if len(name or "") > 100 or not re.fullmatch(_PART, name or ""):
        raise JobInputError(f"{label} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit.",
                            field=field)
    return name


def check_record_name(name: str, label: str, *, field: str = "name") -> str:
    """The name a person picks a model or dataset by (on a page, `extract --model`): words of
    letters, digits, '.', '_' or '-', separated by spaces or by '/' as the Hub writes them
    (EleutherAI/pythia-70m); never '..', a leading '/' or an empty part."""
    if (len(name or "") > 100 or not re.fullmatch(r"[^\W_][\w. /-]*", name or "") or ".." in name
            or "//" in name or name.endswith("/")):
        raise JobInputError(f"{label} {name[:100]!r} cannot be used: use up to 100 letters, digits, spaces, '.', '_', "
                            "'-' or '/', starting with a letter or digit, without '..'.", field=field)
    return name


def not_kept(exc: OSError, *, field: str) -> JobInputError:
    """An upload the data directory cannot hold (full, read-only, a name too long)."""
    return JobInputError(f"The upload cannot be kept in the data directory: {exc.strerror}.", field=field)


class StorageError(OSError):
    """The output cannot be written (no space, read-only, no permission); its message is a sentence."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class Cancelled(Exception):
    """Raised by a runner between steps once should_cancel() said so."""


class StepTimeout(Exception):
    """A step ran past its limit (raised by the worker, or by a failpoint)."""


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError) and len(exc.args) == 1:
        message = str(exc.args[0])
        return any(fragment in message for fragment in _OOM_MESSAGES)
    return False


def is_database_unavailable(exc: BaseException) -> bool:
    """A lost or refused database connection (Django's or psycopg's), not a bad query."""
    module = type(exc).__module__
    return type(exc).__name__ in ("OperationalError", "InterfaceError") and module.startswith(("django.db", "psycopg"))


def classify_error(exc: BaseException) -> str:
    if is_database_unavailable(exc):
        return ErrorType.DATABASE
    if is_oom(exc):
        return ErrorType.OOM
    if isinstance(exc, JobInputError):
        return ErrorType.VALIDATION
    if isinstance(exc, StepTimeout) or type(exc).__name__ == "TimeoutException":
        return ErrorType.TIMEOUT
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        return ErrorType.STORAGE
    return ErrorType.UNKNOWN


_STORAGE_ERRNOS = {
    errno.ENOSPC: "No space left on the device",
    errno.EDQUOT: "The disk quota is exceeded",
    errno.EROFS: "The file system is read-only",
    errno.EACCES: "Permission denied",
}

# What a person should do next, per error type: pushed with every failure, shown on the pages.
NEXT_STEP = {
    ErrorType.OOM: "Retry with the suggested (half) batch size, or turn on auto retry on OOM.",
    ErrorType.VALIDATION: "Fix the input the message names; retrying unchanged fails again.",
    ErrorType.TIMEOUT: "Retried automatically; if it keeps timing out, raise JOBSITE_TIMEOUT_S or lower max_samples.",
    ErrorType.STORAGE: "Free space or fix permissions on the output directory, then retry: completed work is kept.",
    ErrorType.DATABASE: "Retried automatically once the database is back, from the checkpoint.",
    ErrorType.WORKER_LOST: "Retried automatically; after the last attempt, resume or retry by hand.",
    ErrorType.EXTRACTION: "Read the message, then retry.",
    ErrorType.TRAINING: "Read the message, then proceed to resume from the last checkpoint.",
    ErrorType.CANCELLED: "Stopped on request; retry to run it again.",
    ErrorType.UNKNOWN: "Read the worker log for the cause, then retry.",
}


def next_step(error_type: str) -> str:
    return NEXT_STEP.get(error_type, "") if error_type else ""


def error_sentence(exc: BaseException) -> str:
    """One line a person can read: the exception's message without a traceback."""
    if isinstance(exc, OSError) and not isinstance(exc, StorageError) and exc.errno in _STORAGE_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{_STORAGE_ERRNOS[exc.errno]}{where}."[:2000]
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return message[:2000]
