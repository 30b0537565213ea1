"""Opening shards anywhere fsspec reaches, with bounded retries and clear errors.

Why a layer of our own: object stores fail transiently (503 SlowDown, reset connections,
bodies cut short), s3fs and botocore retry some of that but give up with errors that
mix transient and permanent causes, and their messages may quote request details. Here
every read goes through `RetryingReader`, which re-opens the object and seeks back to
where it was on a transient error (so a cut body costs one ranged GET, not the shard),
and every permanent error becomes a `ShardNotFound` / `AccessDenied` / `StorageError`
naming the URL -- masked (pipelines/shards/masking.py): no keys, no signed query strings.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from sslstream.pipelines.shards.masking import mask, mask_exception, remember

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "AccessDenied",
    "RetryPolicy",
    "RetryingReader",
    "ShardNotFound",
    "StorageError",
    "classify",
    "get_fs",
    "open_reader",
    "plain",
    "read_bytes",
    "register_webdataset_gopen",
    "resolve_storage_options",
    "with_retries",
]

_TRANSIENT_ERRNO = {
    errno.EBUSY,  # s3fs: 503 SlowDown
    errno.EIO,  # s3fs: unknown code; also local I/O hiccups (bounded anyway)
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: 500 InternalError
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
}


_UNREACHABLE_FIX = (" -- check the network and the endpoint (AWS_ENDPOINT_URL, "
                    "data.storage_options.client_kwargs.endpoint_url)")


class StorageError(OSError):
    """A storage operation failed for good; the message names the URL, never credentials
    (message and `url` are masked here, whoever built them)."""

    def __init__(self, message: str, url: str) -> None:
        remember(url, environment=False)  # its user info, wherever a library's text quotes it
        super().__init__(mask(message))
        self.url = mask(url)


class ShardNotFound(StorageError, FileNotFoundError):
    pass


class AccessDenied(StorageError, PermissionError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: delay = min(max_delay, base_delay * 2**attempt) * U(0.5, 1)."""

    attempts: int = 6  # tries per operation (first + 5 retries)
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


def plain(obj: Any) -> Any:
    """Mappings/sequences (e.g. OmegaConf containers from the config) as plain dicts/lists."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [plain(v) for v in obj]
    return obj


def resolve_storage_options(url: str, storage_options: dict | None = None) -> dict:
    """fsspec options for `url`: the given ones, plus the endpoint from AWS_ENDPOINT_URL(_S3).

    Credentials are left to the backend's own chain (AWS_* env, profiles, instance roles;
    GOOGLE_APPLICATION_CREDENTIALS for gcsfs), so they never pass through our code.
    """
    opts = plain(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        ck = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in ck and "endpoint_url" not in opts:
            ck["endpoint_url"] = endpoint
        if ck:
            opts["client_kwargs"] = ck
    return opts


def gcs_emulator_defaults() -> None:
    """With `STORAGE_EMULATOR_HOST` set (a GCS emulator or GCS-compatible endpoint), make
    gcsfs use its plain filesystem unless the user chose: gcsfs >= 2025 defaults to an
    "extended" one that asks GCS's gRPC control plane for every bucket's type, which such
    endpoints do not serve, and every call then spends 60 s in retries. gcsfs reads the
    switch when it is imported, so this acts only before the first gs:// use."""
    if os.environ.get("STORAGE_EMULATOR_HOST") and "gcsfs" not in sys.modules:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def get_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; a missing backend (gcsfs) is an error naming the URL."""
    if url.startswith(("gs://", "gcs://")):
        gcs_emulator_defaults()
    try:
        return fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    except ImportError as e:
        raise StorageError(f"no filesystem for {url}: {e} (pip install gcsfs for gs://)", url) from None


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) from anywhere in the chain: a botocore ClientError (AWS code
    and status), or gcsfs's HttpError (its int `code` is the HTTP status, no named code)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return resp["Error"].get("Code"), status
        if type(e).__name__ == "HttpError" and isinstance(getattr(e, "code", None), int):
            return None, e.code  # type: ignore[attr-defined]
        e = e.__cause__ or e.__context__
        seen += 1
    return None, None


def _gcs_forbidden(exc: BaseException) -> bool:
    """gcsfs turns a 403 into a bare OSError("Forbidden: <path>...") without an errno."""
    return type(exc) is OSError and exc.errno is None and str(exc).startswith("Forbidden")


def classify(exc: BaseException) -> str:
    """'not_found', 'denied', 'transient' or 'fatal' for an exception from a read."""
    code, status = _error_code(exc)
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "NoSuchBucket", "404"):
        return "not_found"
    if "Credentials" in type(exc).__name__:  # botocore NoCredentialsError & co.
        return "denied"
    if isinstance(exc, PermissionError) or _gcs_forbidden(exc) or status in (401, 403) or code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    ):
        return "denied"
    if code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"):
        return "transient"
    if status is not None and (status >= 500 or status in (408, 429)):
        return "transient"
    if isinstance(exc, (ConnectionError, TimeoutError, EOFError)):
        return "transient"
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return "transient"
    name = type(exc).__name__
    if any(s in name for s in ("Payload", "Disconnected", "Timeout", "IncompleteRead", "Connection",
                               "HTTPClientError", "StreamingError", "ProxyError")):
        return "transient"  # aiohttp / urllib3 / botocore transport errors
    return "fatal"


def _permanent(exc: BaseException, url: str, what: str) -> BaseException:
    kind = classify(exc)
    if kind == "not_found":
        return ShardNotFound(f"{what}: {url} does not exist", url)
    if kind == "denied":
        code, _ = _error_code(exc)
        return AccessDenied(
            f"{what}: access denied for {url}"
            + (f" ({code})" if code else "")
            + " -- check the credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE, GOOGLE_APPLICATION_"
            "CREDENTIALS) and data.storage_options",
            url,
        )
    reason = mask_exception(exc)
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    return StorageError(f"{what}: {url}: {reason} -- check the URL and data.storage_options"
                        + _URL_CREDENTIALS_FIX * _has_userinfo(url), url)


_URL_CREDENTIALS_FIX = (" (credentials in an object-store URL are not used: give them in the "
                        "environment, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                        "GOOGLE_APPLICATION_CREDENTIALS, or in data.storage_options)")


def _has_userinfo(url: str) -> bool:
    """`s3://KEY:SECRET@bucket/...`: fsspec's object stores read the user info as part of
    the bucket name."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and scheme in ("s3", "s3a", "gs", "gcs") and "@" in rest.split("/", 1)[0]


def with_retries(
    fn: Callable[[], T],
    url: str,
    *,
    what: str = "reading",
    policy: RetryPolicy | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Call fn(); retry transient failures with backoff; turn the rest into StorageError."""
    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            kind = classify(e)
            if kind != "transient" or attempt == policy.attempts - 1:
                if kind == "transient":
                    raise StorageError(
                        f"{what}: {url}: gave up after {policy.attempts} attempts "
                        f"({type(e).__name__}){_UNREACHABLE_FIX}",
                        url,
                    ) from None
                raise _permanent(e, url, what) from None
            if on_retry:
                on_retry(e)
            log.warning("%s %s: transient %s, retry %d", what, mask(url), type(e).__name__,
                        attempt + 1)
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


class RetryingReader(io.RawIOBase):
    """A read-only stream over one object that survives transient faults.

    On an error (or an early EOF before the object's known size) it closes the underlying
    file, waits, re-opens it and seeks to the current position: for S3 that is one ranged
    GET. At most `policy.attempts` consecutive failures without progress.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        *,
        policy: RetryPolicy | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        block_size: int = 8 << 20,
        fresh: bool = False,
    ) -> None:
        super().__init__()
        self.url = url
        self.policy = policy or RetryPolicy()
        self.on_retry = on_retry
        self._fs, self._path = get_fs(url, storage_options)
        self._block = block_size
        if fresh:  # an object that may have been rewritten: no size from an earlier listing
            self._fs.invalidate_cache(self._path)
        self.size: int = with_retries(
            lambda: int(self._fs.size(self._path)), url, what="opening", policy=self.policy,
            on_retry=on_retry,
        )
        if self.size is None:
            raise StorageError(f"opening: {url}: size unknown", url)
        self.pos = 0
        self._f: Any = None
        self._open()

    def _open(self) -> None:
        def op() -> Any:
            proto = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
            kw: dict[str, Any] = {}
            if "file" not in proto:
                kw["block_size"] = self._block
            if "s3" in proto:
                kw["size"] = self.size  # spares s3fs a second HEAD per open
            f = self._fs.open(self._path, "rb", **kw)
            if self.pos:
                f.seek(self.pos)
            return f

        self._f = with_retries(op, self.url, what="opening", policy=self.policy, on_retry=self.on_retry)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.pos >= self.size:
            return 0
        view = memoryview(b).cast("B")
        fails = 0
        while True:
            try:
                data = self._f.read(len(view))
                if not data and self.pos < self.size:
                    raise EOFError(f"early end of data at {self.pos} of {self.size}")
                n = len(data)
                view[:n] = data
                self.pos += n
                return n
            except Exception as e:
                kind = classify(e)
                fails += 1
                if kind != "transient" or fails >= self.policy.attempts:
                    self._close_quiet()
                    if kind == "transient":
                        raise StorageError(
                            f"reading: {self.url}: gave up after {fails} attempts at byte "
                            f"{self.pos} ({type(e).__name__}){_UNREACHABLE_FIX}",
                            self.url,
                        ) from None
                    raise _permanent(e, self.url, "reading") from None
                if self.on_retry:
                    self.on_retry(e)
                log.warning("reading %s: transient %s at byte %d, retrying", mask(self.url),
                            type(e).__name__, self.pos)
                self._close_quiet()
                time.sleep(self.policy.delay(fails - 1))
                self._open()

    def _close_quiet(self) -> None:
        try:
            if self._f is not None:
                self._f.close()
        except Exception:  # closing a broken connection may raise again; nothing to do
            pass
        self._f = None

    def close(self) -> None:
        self._close_quiet()
        super().close()


def open_reader(url: str, storage_options: dict | None = None, **kw: Any) -> io.BufferedReader:
    """A buffered, retrying reader for `url` (see RetryingReader)."""
    return io.BufferedReader(RetryingReader(url, storage_options, **kw), buffer_size=1 << 20)


def read_bytes(url: str, storage_options: dict | None = None, **kw: Any) -> bytes:
    """The whole object (small files: manifests). Its size is asked of the store, never taken
    from a listing fsspec cached earlier in the process: a manifest is rewritten when its
    shard set grows, and a stale size would cut the new one short."""
    with open_reader(url, storage_options, fresh=True, **kw) as f:
        return f.read()


def register_webdataset_gopen(storage_options: dict | None = None) -> None:
    """Let webdataset 1.0.2 open s3:// and gs:// URLs through fsspec (it has no handler)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package shadows it with a function

    def opener(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> Any:
        if "r" in mode:
            return open_reader(url, storage_options)
        fs, path = get_fs(url, storage_options)
        return fs.open(path, mode)

    for scheme in ("s3", "gs", "gcs"):
        gopen.gopen_schemes[scheme] = opener
