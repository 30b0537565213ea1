"""`mask`: the one rule for what a message, a log line, an MLflow param or an exception text
may show of a credential -- nothing.

Why one function at the lowest layer: credentials reach a terminal, a log file or the
tracking server through URLs (`s3://KEY:SECRET@bucket/...`, `https://user:token@mlflow`, a
presigned `...?X-Amz-Signature=...`), storage options (`{"secret": ...}`) and exception
texts that quote either. Every layer that prints, logs or sends to MLflow imports this
module (pipelines.shards is below everything), so one rule decides what is a secret:

- a URL's user info, `scheme://user:password@host` -> `scheme://***@host`, up to the
  authority's *last* `@` (a password with an unencoded `@` is masked whole); an `@` after
  a `/`, `?` or `#` counts too when a `:` comes before it (`user:pa/ss@host`), so a
  password holding those characters is masked whole as well;
- credential query parameters and `name=value` pairs (X-Amz-Signature, X-Amz-Credential,
  X-Amz-Security-Token, X-Goog-Signature, Signature, sig, token, password, ...) and an
  `Authorization: <scheme> <credentials>` header: the value becomes `***`;
- `{...}` literals in text (a dict's repr, a Hydra override `{key: AKIA.., anon: true}`):
  the value of every key that names a secret (as for storage options, below);
- mappings (configs, storage options): the value of every key that names a secret
  (secret, password, token, credential, authorization; inside `storage_options`, also
  `key` and `session`) becomes `***`, and every string in them is masked as text.

A secret that reaches a message *without* those marks -- a library error quoting the bucket
name s3fs made of `KEY:SECRET@bucket`, an environment value echoed by a client -- is caught
by `remember`: the CLI hands it the composed config, the command's URLs and options and
the credential variables of the environment, and `mask` then hides each secret found in
them (URL user info and its parts, credential query values, secret keys' values; at least
MIN_REMEMBERED characters long) wherever it appears.

`install_log_masking` applies the same rule to every log record of the process (any
logger, MLflow's included), before any handler formats it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = ["MASK", "install_log_masking", "mask", "mask_exception", "remember"]

MASK = "***"
MIN_REMEMBERED = 6  # shorter values ("test", "x") would mask ordinary words everywhere
ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")
_known: tuple[str, ...] = ()  # longest first: a password is masked inside its user info
_known_lock = threading.Lock()

_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>`]*)")
_AUTH_END = re.compile(r"[/?#]")
_CREDENTIAL_NAMES = (
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|x-goog-security-token|signature|sig|token|access_token|id_token|"
    r"refresh_token|api_key|apikey|secret|client_secret|password|passwd|pwd|credential|"
    r"credentials|awsaccesskeyid|aws_secret_access_key|aws_session_token|session_token")
# name=value in a query string or free text; `key` alone only in a query string
_QUERY_PAIR = re.compile(rf"(?i)([?&;](?:{_CREDENTIAL_NAMES}|key)=)[^&#\s'\"<>]*")
_TEXT_PAIR = re.compile(rf"(?i)(?<![\w-])((?:{_CREDENTIAL_NAMES})=)[^&\s'\"<>,;]*")
_AUTHORIZATION = re.compile(r"""(?i)\b(authorization['"]?\s*[:=]\s*['"]?)[^'"\n,}]+""")
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACE_PAIR = re.compile(
    r"""(?i)((?:^|[{,\s])['"]?[\w-]*(?:secret|password|passwd|token|credential|key|session|"""
    r"""authorization)"""
    r"""[\w-]*['"]?\s*[:=]\s*)('[^']*'|"[^"]*"|[^,}]*)""")
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|authorization",
                         re.IGNORECASE)
_OPTION_SECRET_KEY = re.compile(
    r"secret|password|passwd|token|credential|authorization|key|session", re.IGNORECASE)


def _userinfo_end(rest: str) -> int:
    """Where the user info of a URL (without its scheme) ends (its '@'), or -1."""
    end = _AUTH_END.search(rest)
    auth_end = end.start() if end else len(rest)
    at = rest.rfind("@", 0, auth_end)
    if at < 0 and ":" in rest[:auth_end]:
        at = rest.rfind("@")  # a '/', '?' or '#' inside an unencoded password
    return at


def _mask_url(m: re.Match[str]) -> str:
    scheme, rest = m.group(1), m.group(2)
    at = _userinfo_end(rest)
    if at >= 0:
        rest = MASK + rest[at:]
    return scheme + _QUERY_PAIR.sub(rf"\g<1>{MASK}", rest)


def _mask_braces(m: re.Match[str]) -> str:
    return _BRACE_PAIR.sub(rf"\g<1>{MASK}", m.group(0))


def _mask_text(text: str) -> str:
    for secret in _known:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _TEXT_PAIR.sub(rf"\g<1>{MASK}", _URL.sub(_mask_url, text))
    text = _AUTHORIZATION.sub(rf"\g<1>{MASK}", text)
    return _BRACES.sub(_mask_braces, text) if "{" in text else text


def mask(value: Any, *, options: bool = False) -> Any:
    """`value` with every credential replaced by `***` (module docstring): a string as
    text, a mapping as a plain dict (keys that name a secret lose their value;
    `options=True`: the mapping is storage options), a list or tuple as a list; anything
    else unchanged."""
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            name = str(k)
            inside = options or "storage_options" in name
            secret = (_OPTION_SECRET_KEY if options else _SECRET_KEY).search(name)
            if secret and not isinstance(v, Mapping | list | tuple) and v is not None:
                out[name] = MASK
            else:
                out[name] = mask(v, options=inside)
        return out
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [mask(v, options=options) for v in value]
    return value


def _secrets_in(value: Any, options: bool = False) -> Iterator[str]:
    if isinstance(value, str):
        for m in _URL.finditer(value):
            rest = m.group(2)
            at = _userinfo_end(rest)
            if at >= 0:
                info = rest[:at]
                user, _, password = info.partition(":")
                yield from (info, password, unquote(info), unquote(password))
                if password:
                    yield from (user, unquote(user))
            yield from (q.group(0).split("=", 1)[1] for q in _QUERY_PAIR.finditer(rest))
        yield from (p.group(0).split("=", 1)[1] for p in _TEXT_PAIR.finditer(value))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            name = str(k)
            inside = options or "storage_options" in name
            if (_OPTION_SECRET_KEY if options else _SECRET_KEY).search(name) and \
                    isinstance(v, str | int) and not isinstance(v, bool):
                yield str(v)
            else:
                yield from _secrets_in(v, inside)
    elif isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        for v in value:
            yield from _secrets_in(v, options)


def remember(*values: Any, environment: bool = True) -> None:
    """Make the secrets inside `values` (configs, URLs, storage options) -- and, with
    `environment`, the values of ENV_SECRETS -- known to `mask`, which then hides them
    wherever they appear (module docstring)."""
    found = {s for v in values for s in _secrets_in(v)}
    if environment:
        found |= {os.environ.get(n, "") for n in ENV_SECRETS}
    found = {s for s in found if len(s) >= MIN_REMEMBERED and s != MASK}
    global _known
    with _known_lock:
        _known = tuple(sorted(set(_known) | found, key=len, reverse=True))


def mask_exception(e: BaseException) -> str:
    """`Type: message` of an exception, masked, on one line."""
    return mask(f"{type(e).__name__}: {e}".replace("\n", " "))


def _masking_factory(base: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            record.msg, record.args = mask(record.getMessage()), None
        except Exception:  # a bad format string: left to the handler's own error report  # noqa: BLE001
            return record
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip())
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return record

    return factory


_installed: Any = None  # the record factory install_log_masking set, if any


def install_log_masking() -> None:
    """Mask every log record this process creates from now on (idempotent)."""
    global _installed
    base = logging.getLogRecordFactory()
    if base is not _installed:
        _installed = _masking_factory(base)
        logging.setLogRecordFactory(_installed)
