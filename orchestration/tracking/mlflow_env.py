"""Where MLflow talks to, and how long it may take: URI resolution, HTTP limits, probing.

Used by the Tracker and by the registry helpers (which the retraining job calls without a
run), so both resolve and reach the server the same way.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from sslstream.orchestration.errors import ConfigError, UserError
from sslstream.orchestration.schema.tracking import HttpSettings
from sslstream.pipelines.shards.masking import mask, remember

ENV_URI = "MLFLOW_TRACKING_URI"
# MLflow's own knobs; its defaults make a client wait ~250 s on a dead server.
ENV_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
ENV_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
ENV_BACKOFF = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
# Our defaults (tracking.http.*: orchestration/schema/tracking.py): a refused connection fails a
# call in ~3 s (backoff 1 + 2 s), a hung server in (max_retries + 1) * timeout + backoff
# ~ 33 s, instead of MLflow's ~250 s.


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """``sqlite:////abs/path/mlflow.db`` in ``cwd``: absolute, so a later chdir cannot move it."""
    path = Path(cwd or os.getcwd()).resolve() / "mlflow.db"
    return f"sqlite:///{path}"  # path is absolute: 'sqlite:///' + '/abs' gives the 4 slashes


ENV_USER = "MLFLOW_TRACKING_USERNAME"
ENV_PASSWORD = "MLFLOW_TRACKING_PASSWORD"  # noqa: S105 (a variable's name, not a secret)


def resolve_tracking_uri(configured: str | None) -> str:
    """``$MLFLOW_TRACKING_URI`` wins, then the config's ``tracking.uri``, then local sqlite.

    Credentials in the URI (``http://user:password@host``) are moved out of it, into
    MLflow's own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (HTTP basic
    auth, the same header the URL form sends): MLflow then never holds them in a URI, so
    none of its own lines (``View run ... at: <uri>``), errors or logged tags can print
    them. The environment's URI is rewritten too (child processes inherit it clean). A URI
    whose credentials cannot be told from its host is refused (ConfigError, masked) before
    anything is sent (see ``move_credentials``).
    """
    env = os.environ.get(ENV_URI)
    uri = env or configured or default_tracking_uri()
    clean = move_credentials(uri)
    if env and clean != env:
        os.environ[ENV_URI] = clean
    return clean


# the user info ends at the authority's LAST '@' (a password may hold an unencoded '@')
_HTTP_USERINFO = re.compile(r"^(https?://)([^/?#\s]*)@")


def move_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@``; those go to the MLflow auth variables.

    The user info ends at the authority's last ``@``, so ``user:p@ss@host`` sends the
    password ``p@ss`` to ``host``. An ``@`` still left after that (a password holding an
    unencoded ``/``, ``?`` or ``#``) makes the host unknowable: ConfigError, with the URI
    masked, before any request."""
    remember(uri, environment=False)
    m = _HTTP_USERINFO.match(uri)
    rest = uri[m.end():] if m else uri.split("://", 1)[-1]
    if is_http(uri) and "@" in rest:
        raise ConfigError(
            f"config error: the MLflow tracking URI {mask(uri)} has an '@' after its host: "
            "a user name or password in it holds an unencoded '/', '?' or '#' (or '@'). "
            "Percent-encode them (%2F, %3F, %23, %40), or set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD and leave them out of the URI", ENV_URI)
    if not m:
        return uri
    from urllib.parse import unquote

    user, _, password = m.group(2).partition(":")
    if user:
        os.environ[ENV_USER] = unquote(user)
    if password:
        os.environ[ENV_PASSWORD] = unquote(password)
    return m.group(1) + uri[m.end():]


def shown_uri(uri: str) -> str:
    """`uri` for messages: credentials masked; an HTTP store whose credentials were moved to
    MLFLOW_TRACKING_USERNAME shows `***@` where they go."""
    shown = mask(uri)
    if is_http(shown) and "@" not in shown.split("/")[2] and os.environ.get(ENV_USER):
        scheme, rest = shown.split("://", 1)
        shown = f"{scheme}://***@{rest}"
    return shown


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact location for an experiment created on a local sqlite backend.

    MLflow's default is ``./mlruns/<id>`` of whatever directory the process runs in; pinning
    it next to the database (``<db dir>/mlruns/<experiment>``) keeps runs and their
    artifacts together. None for servers: they choose (``--artifacts-destination``).
    """
    if uri.startswith("sqlite:///"):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment) or "default"
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns" / safe).as_uri()
    return None


def apply_http_limits(max_retries: int, timeout_s: float, backoff_factor: int) -> None:
    """Bound MLflow's HTTP retries; variables already set in the environment win.

    MLflow parses all three as integers (seconds; backoff = factor * 2**retry seconds).
    """
    os.environ.setdefault(ENV_MAX_RETRIES, str(int(max_retries)))
    os.environ.setdefault(ENV_TIMEOUT, str(int(max(1, round(timeout_s)))))
    os.environ.setdefault(ENV_BACKOFF, str(int(backoff_factor)))


def ensure_http_limits(uri: str) -> None:
    """Apply the default HTTP limits for ``uri`` unless the config or environment set them.

    Called by every registry helper, because they also run outside a Tracker (the retraining
    job, warm starts, user scripts) where nothing else would bound MLflow's retries.
    """
    if is_http(uri):
        h = HttpSettings()  # tracking.http's defaults
        apply_http_limits(h.max_retries, h.timeout_s, h.backoff_factor)


class StoreNotFound(UserError, FileNotFoundError):
    """A tracking store to read from does not exist (and must not be created by reading)."""


def local_store_path(uri: str) -> Path | None:
    """The file (sqlite) or folder (file store) behind a local tracking URI; None otherwise."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith(("/", "./", "../")):  # a plain path is a file store to MLflow
        return Path(uri)
    return None


def require_store(uri: str, what: str) -> None:
    """Raise StoreNotFound when the local store `uri` is absent: reading `what` from it would
    make MLflow create an empty store there (a stray mlflow.db) and then fail to find it."""
    path = local_store_path(uri)
    if path is None or path.exists():
        return
    raise StoreNotFound(
        f"cannot load {what}: there is no MLflow store at {mask(uri)} (nothing was created). "
        f"A models:/ URI lives in the store of the run that registered it, which the run "
        f"printed: set MLFLOW_TRACKING_URI=<that store> (or tracking.uri=<that store>)")


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No per-file progress bar while MLflow downloads a model's artifacts (dozens of files
    for one encoder: noise in a log); the variable set by the user wins."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def probe(uri: str, timeout_s: float) -> str | None:
    """One bounded reachability check: None when reachable, else why not.

    Only HTTP servers are probed (``GET <uri>/health``, no retries): a refused connection
    answers in milliseconds instead of going through MLflow's retry schedule.
    """
    if not is_http(uri):
        return None
    # without user:password@ (urllib cannot send it; /health needs no auth), never shown
    url = _HTTP_USERINFO.sub(r"\1", uri.rstrip("/")) + "/health"
    shown = url
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http only)
            if resp.status != 200:
                return f"GET {shown} answered HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"GET {shown} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"GET {shown} failed: {reason}"
    return None


@contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global (fluent) API at ``uri`` for a block, then restore it.

    Needed for the few MLflow entry points without a ``tracking_uri`` argument (logging a
    model). ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``; restoring the
    variable keeps "the environment wins" meaningful for later Trackers in the same process.
    """
    old_env = os.environ.get(ENV_URI)
    old_uri = mlflow.get_tracking_uri() if old_env is not None else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = old_env
