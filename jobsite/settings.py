"""jobsite settings: twelve-factor, every knob an environment variable.

Embedded default (no variables set): SQLite under JOBSITE_DATA_DIR, django-q2 ORM broker
on the same database, in-memory channel layer with consumers tailing the event table.
DATABASE_URL and REDIS_URL switch to PostgreSQL and channels-redis.
"""

import os
import socket
import sys
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "jobsite-local-development-key-change-me-in-production")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
CSRF_FAILURE_VIEW = "jobsite.views.csrf_failure"
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

JOBSITE_DATA_DIR = Path(os.environ.get("JOBSITE_DATA_DIR", BASE_DIR / ".data")).resolve()
# Model directories are only read from below these roots (colon separated).
JOBSITE_MODEL_ROOTS = [
    Path(p).resolve()
    for p in os.environ.get("JOBSITE_MODEL_ROOTS", str(JOBSITE_DATA_DIR / "models")).split(os.pathsep)
    if p
]

# Heartbeat, stall, timeout and automatic retry policy (seconds unless named otherwise).
JOBSITE_HEARTBEAT_S = env_float("JOBSITE_HEARTBEAT_S", 10)
JOBSITE_STALL_AFTER_S = env_float("JOBSITE_STALL_AFTER_S", 30)
JOBSITE_TIMEOUT_S = env_float("JOBSITE_TIMEOUT_S", 6 * 3600)
JOBSITE_CANCEL_GRACE_S = env_float("JOBSITE_CANCEL_GRACE_S", 30)
JOBSITE_WATCHDOG_EVERY_S = env_float("JOBSITE_WATCHDOG_EVERY_S", 10)
JOBSITE_RETRY_BASE_S = env_float("JOBSITE_RETRY_BASE_S", 10)
JOBSITE_RETRY_FACTOR = env_float("JOBSITE_RETRY_FACTOR", 2)
JOBSITE_RETRY_MAX_S = env_float("JOBSITE_RETRY_MAX_S", 300)
JOBSITE_MAX_ATTEMPTS = int(os.environ.get("JOBSITE_MAX_ATTEMPTS", 3))
# A sharded extraction of at least this many samples is tokenized in parts, one per shard, by as
# many workers (below it, one worker tokenizes faster than the parts' hand-offs cost).
JOBSITE_TOKENIZE_PARTS_FROM = int(os.environ.get("JOBSITE_TOKENIZE_PARTS_FROM", 200_000))
# A job's progress is stored on its row, and pushed as an event, at most this often (the last one always goes).
JOBSITE_PROGRESS_EVERY_S = env_float("JOBSITE_PROGRESS_EVERY_S", 0.5)
# Imported by a cluster before it forks its workers, so that a fresh worker's first job does not
# spend seconds importing torch and transformers after taking its task: a shard a cold worker
# took was claimed meanwhile by a warm one, and the job ran on one worker. Comma separated.
JOBSITE_WORKER_PRELOAD = [name for name in os.environ.get(
    "JOBSITE_WORKER_PRELOAD", "extraction.runner,training_runs.trainer,transformers.modeling_utils").split(",") if name]
# How often a consumer reads the event table: the only path without Redis, a safety net with it.
JOBSITE_EVENT_POLL_S = env_float("JOBSITE_EVENT_POLL_S", 0.25)
# Failpoints make a named worker step fail on purpose; JSON, off by default. See jobsite/failpoints.py.
JOBSITE_FAILPOINTS = os.environ.get("JOBSITE_FAILPOINTS", "")
JOBSITE_HOSTNAME = os.environ.get("JOBSITE_HOSTNAME", socket.gethostname())

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_q",
    "django_htmx",
    "ninja",  # its Swagger UI from its own static files (without it the docs page loads it from a CDN)
    "jobsite",
    "extraction",
    "training_runs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "jobsite.api.json_refusals",
]

ROOT_URLCONF = "jobsite.urls"
ASGI_APPLICATION = "jobsite.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

JOBSITE_DATA_DIR.mkdir(parents=True, exist_ok=True)
_sqlite_default = f"sqlite:///{JOBSITE_DATA_DIR / 'jobsite.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(os.environ.get("DATABASE_URL", _sqlite_default), conn_max_age=0)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and heartbeat threads write concurrently: WAL plus a generous busy timeout,
    # and IMMEDIATE transactions so a writer waits instead of failing mid-transaction.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["TEST"] = {"NAME": str(JOBSITE_DATA_DIR / "test-jobsite.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Shared by every process: django-q2 keeps its cluster stats here, which the health check reads.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "jobsite_cache"}}

# django-q2 as a transport only (DESIGN.md): the ORM broker survives a worker crash, it never
# retries by itself (max_attempts=1, failures acknowledged, redelivery window far beyond the
# timeout); retries and resume are jobsite decisions recorded on the job rows.
Q_CLUSTER = {
    "name": "jobsite",
    "orm": "default",
    "workers": int(os.environ.get("JOBSITE_WORKERS", 1)),
    "timeout": int(JOBSITE_TIMEOUT_S),
    "retry": int(JOBSITE_TIMEOUT_S) + 3600,
    "max_attempts": 1,
    "ack_failures": True,
    "save_limit": 1000,
    "catch_up": False,
    "poll": env_float("JOBSITE_QUEUE_POLL_S", 0.5),
    "label": "Task queue",
}

AUTH_PASSWORD_VALIDATORS = []
LOGIN_URL = "/admin/login/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = JOBSITE_DATA_DIR / "static"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("JOBSITE_LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
# A management command prints its own sentences; django-q's INFO lines ("Enqueued [jobsite] 12")
# would come between them. The worker (qcluster) and the servers keep them in their logs.
_COMMAND = sys.argv[1] if len(sys.argv) > 1 and Path(sys.argv[0]).name == "manage.py" else ""
if _COMMAND and _COMMAND not in ("qcluster", "runserver", "qmonitor", "qinfo", "qmemory"):
    LOGGING["loggers"]["django-q"] = {"level": "WARNING"}

# Training runs: the encoder whose embeddings the adapter is trained on (a local directory
# under JOBSITE_MODEL_ROOTS), and the causal LM the "causal_lm" query generator uses.
JOBSITE_ENCODER_PATH = os.environ.get("JOBSITE_ENCODER_PATH", str(JOBSITE_MODEL_ROOTS[0] / "all-MiniLM-L6-v2"))
JOBSITE_GENERATOR_MODEL_PATH = os.environ.get("JOBSITE_GENERATOR_MODEL_PATH", str(JOBSITE_MODEL_ROOTS[0] / "tiny-gpt2"))
JOBSITE_MIN_APPROVED_PAIRS = int(os.environ.get("JOBSITE_MIN_APPROVED_PAIRS", 10))

# Where extraction runs: "cpu", "cuda", "cuda:1"... (a worker on a GPU host sets it).
JOBSITE_DEVICE = os.environ.get("JOBSITE_DEVICE", "cpu")

# Pages (templates/, jobsite/views.py, extraction/views.py). Their own login: the admin's
# refuses users who are not staff, and reading a page only needs a login.
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/extractions/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
# A page with an active job polls the JSON API when its WebSocket has been silent this long.
JOBSITE_POLL_FALLBACK_S = env_float("JOBSITE_POLL_FALLBACK_S", 30)
# A job without progress for this long shows "Taking longer than expected" with Retry and Cancel.
JOBSITE_SLOW_AFTER_S = env_float("JOBSITE_SLOW_AFTER_S", 300)
# redis-py 8 reads with a 5 s socket timeout by default, as long as channels-redis blocks in
# BZPOPMIN: a WebSocket consumer with nothing to receive for 5 s then died ("Timeout reading
# from ...", close code 1011). A read timeout above the blocking time keeps it alive.
if REDIS_URL:
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [{"address": REDIS_URL, "socket_timeout": 15}]
