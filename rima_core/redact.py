"""Credentials out of everything the pipeline writes for others to read.

Settings such as ``tune.storage`` (``postgresql://user:PASSWORD@host/db``), ``mlflow.tracking_uri``
(``https://user:PASSWORD@mlflow``) or a presigned ``s3://`` / ``https://`` data URL
(``?X-Amz-Signature=...``) can hold a secret. The process needs the real value to connect, but
MLflow params and tags, logged artifacts, logs, saved configs and compiled pipelines are read by
people and systems that must not learn it. Every such exit point passes its text through this one
module, so there is one definition of "a credential in a URL":

- the password of a URL's user info (``user:PASSWORD@``), and the whole user info of an
  ``http(s)``/``s3``-style URL without a password (``https://TOKEN@host`` is a token);
- the value of a query parameter whose name says it is secret (``password``, ``token``,
  ``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``, ``api_key``, ...).

The replacement is :data:`MASK`, so a reader still sees *which* setting held a credential. This
module is pure string work (no imports beyond the standard library) because it runs on every log
record.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

MASK = "***"

# A URL inside arbitrary text: scheme://then anything up to whitespace or a quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# ``scheme://user[:password]@``: user without ":/?#@", password up to the first "@".
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<user>[^:/?#@\s]*)(?P<colon>:[^@\s]*)?@"
)
# Query parameter names that carry a secret (case-insensitive, anywhere in the name).
_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|signature|credential|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|auth|session|^sig$|^key$",
    re.IGNORECASE,
)
# Schemes where user info without a password is still a bearer secret (``https://TOKEN@host``).
_TOKEN_USERINFO_SCHEMES = frozenset({"http", "https", "s3", "s3a", "gs", "git+https", "ftp"})


def is_secret_name(name: str) -> bool:
    """Whether a key/parameter name says its value is a credential (``password``, ``token``)."""
    return bool(_SECRET_NAME.search(name))


def _redact_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs or not any(is_secret_name(k) for k, _ in pairs):
        return query
    return "&".join(
        f"{quote(k, safe='')}={MASK if is_secret_name(k) else quote(v, safe='/:@')}"
        for k, v in pairs
    )


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by :data:`MASK`; anything else unchanged.

    ``postgresql://optuna:s3cr3t@db:5432/optuna`` -> ``postgresql://optuna:***@db:5432/optuna``;
    ``https://b.s3.amazonaws.com/k?X-Amz-Signature=ab&x=1`` -> ``...?X-Amz-Signature=***&x=1``.
    A string that is not a ``scheme://`` URL is returned as is.
    """
    if "://" not in url:
        return url
    # User info first, on the raw text and with SQLAlchemy's rule (the password runs to the
    # first "@"): a password holding an unescaped "/" or "#" would make urlsplit see no "@".
    m = _USERINFO.match(url)
    if m:
        scheme, user, colon = m.group("scheme"), m.group("user"), m.group("colon")
        if colon:
            url = f"{scheme}://{user}:{MASK}@{url[m.end():]}"
        elif scheme.lower() in _TOKEN_USERINFO_SCHEMES:
            url = f"{scheme}://{MASK}@{url[m.end():]}"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 literal: mask everything after the scheme
        return f"{url.split('://', 1)[0]}://{MASK}"
    query = _redact_query(parts.query)
    fragment = _redact_query(parts.fragment)
    if query == parts.query and fragment == parts.fragment:
        return url
    out = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if fragment:
        out += f"#{fragment}"
    return out


def redact_text(text: str) -> str:
    """Every URL inside free text (a log line, an error message) passed through
    :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_config(value: Any) -> Any:
    """A copy of a nested dict/list structure (a ``Config.to_dict()``, a flat params dict, a
    summary) with credentials masked: URLs in every string, and the whole value of any string
    under a key named like a secret (``password``, ``token``)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, str) and item and is_secret_name(str(key).rsplit(".", 1)[-1]):
                out[key] = MASK
            else:
                out[key] = redact_config(item)
        return out
    if isinstance(value, list | tuple):
        return type(value)(redact_config(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def find_secrets(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries of a nested structure that :func:`redact_config` would
    change (``["tune.storage"]``): what a compiler or a check refuses to write."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}{key}"
            if isinstance(item, dict | list | tuple):
                found += find_secrets(item, path + ".")
            elif redact_config({key: item}) != {key: item}:
                found.append(path)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += find_secrets(item, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(value, str) and redact_text(value) != value:
        found.append(prefix.rstrip(".") or "<value>")
    return found


class RedactingFilter(logging.Filter):
    """Masks credentials in a log record's final message (and its exception text) before any
    handler formats it, whatever the module that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business, not ours
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(text)
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger).

    A handler filter (not a logger filter) sees records propagated from every child logger,
    MLflow's and Optuna's included. Idempotent."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
