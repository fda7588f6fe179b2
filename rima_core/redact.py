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

Two lines of defence. First, by construction: the config schema marks the settings that can hold
a credential (``field(metadata=SECRET)`` in :mod:`rima_core.config`), and :func:`redact_config`
masks those by their key in every serialisation (a whole value is parsed: its password runs to
the last "@" before the host, whatever characters it holds). Second, for free text (log lines,
tags, error messages): a scan by scheme and last "@" (:func:`redact_text`), plus the verbatim
mask of the secrets this process was configured with (:func:`remember_config_secrets`, the
credential environment variables).

The replacement is :data:`MASK`, so a reader still sees *which* setting held a credential. This
module is pure string work (standard library only; the schema's secret keys are read lazily)
because it runs on every log record.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from rima_core.config import secret_keys

MASK = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*"
# A URL inside arbitrary text (for its query string): scheme://then anything up to whitespace or
# a quote/bracket. User info is found separately (_USERINFO_TEXT), before this runs.
_URL_IN_TEXT = re.compile(rf"{_SCHEME}://[^\s'\"<>`]+")
# ``scheme://user:PASSWORD@`` in free text. A password may hold anything a URL parser would
# take, raw "@", quotes, "<", ">", backticks and spaces included, so it runs to the *last* "@" on
# the line (over-masking a line that has another "@" later is the safe error), but not into the
# next ``scheme://`` nor across whitespace followed by ``scheme:/`` (the next URL or
# ``models:/NAME@alias`` of the line: a second credential is found on its own) — unless no "@"
# comes before it, then again to the last "@" of the line. (Blind spot: a password holding "@"
# and, after it, ``scheme://`` or `` scheme:/``; the verbatim mask below still covers the
# process's own settings.)
# ``scheme://TOKEN@`` (no colon) is a bearer token for some schemes.
_USERINFO_TEXT = re.compile(
    rf"(?P<scheme>{_SCHEME})://(?P<user>[^:/?#@\s'\"<>`]*)"
    rf"(?:(?P<colon>:)(?:(?:(?!\s+{_SCHEME}:/|{_SCHEME}://)[^\r\n])*@|[^\r\n]*@)|@)"
)
# Query parameter names that carry a secret (case-insensitive, anywhere in the name).
_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|signature|credential|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|auth|session|^sig$|^key$",
    re.IGNORECASE,
)
# Schemes where user info without a password is still a bearer secret (``https://TOKEN@host``).
_TOKEN_USERINFO_SCHEMES = frozenset({"http", "https", "s3", "s3a", "gs", "git+https", "ftp"})
# Secrets this process knows verbatim (the passwords of its own settings, see remember_secret):
# masked wherever they appear, whatever surrounds them. Shorter ones would mask ordinary words.
_KNOWN: set[str] = set()
MIN_KNOWN_SECRET = 6
# Environment variables whose whole value is a credential (or a URL holding one).
SECRET_ENV = (
    "RIMA_OPTUNA_STORAGE",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


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


def _split_userinfo(url: str) -> tuple[str, str, str | None, str] | None:
    """``(scheme, user, password or None, rest after the "@")`` of a whole URL value, or None
    when it has no user info. The user info ends at the *last* "@" when there is a password
    (a raw "@", "/", "#", quote or space in a password is the password's), at the first "@"
    otherwise; a value is one URL, so nothing after it can be mistaken for the host."""
    m = re.match(rf"({_SCHEME})://([^:/?#@\s]*)(:?)", url)
    if m is None:
        return None
    scheme, user, colon = m.groups()
    tail = url[m.end() :]
    if colon:
        at = tail.rfind("@")
        if at < 0:
            return None
        return scheme, user, tail[:at], tail[at + 1 :]
    if tail.startswith("@"):
        return scheme, user, None, tail[1:]
    return None


def remember_secret(secret: str | None) -> None:
    """Mask ``secret`` verbatim in every later :func:`redact_text` of this process (a password
    this process was configured with, so a log line that quotes it oddly still hides it)."""
    if secret and len(secret) >= MIN_KNOWN_SECRET and secret != MASK:
        _KNOWN.add(secret)


def remember_secrets_in(value: str | None) -> None:
    """Remember the password (or token) of the URL ``value`` and its percent-decoded form."""
    if not value or "://" not in value:
        return
    parts = _split_userinfo(value)
    if parts is None:
        return
    scheme, user, password, _ = parts
    for secret in (password,) if password is not None else (user,):
        if password is None and scheme.lower() not in _TOKEN_USERINFO_SCHEMES:
            continue
        remember_secret(secret)
        remember_secret(unquote(secret or ""))


def remember_environment() -> None:
    """Remember the credentials held by :data:`SECRET_ENV` variables."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value:
            remember_secrets_in(value) if "://" in value else remember_secret(value)


def remember_config_secrets(flat: dict[str, Any]) -> None:
    """Remember the credentials of a config's secret settings (``Config.flat()``) and of the
    environment, so every later log line or tag of this process masks them verbatim."""
    for key in _secret_keys():
        value = flat.get(key)
        if isinstance(value, str):
            remember_secrets_in(value)
    remember_environment()


def _mask_known(text: str) -> str:
    for secret in sorted(_KNOWN, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by :data:`MASK`; anything else unchanged.

    ``postgresql://optuna:s3cr3t@db:5432/optuna`` -> ``postgresql://optuna:***@db:5432/optuna``;
    ``https://b.s3.amazonaws.com/k?X-Amz-Signature=ab&x=1`` -> ``...?X-Amz-Signature=***&x=1``.
    A string that is not a ``scheme://`` URL is returned as is. ``url`` is one value (a setting),
    so its password runs to the last "@" (:func:`_split_userinfo`); free text goes through
    :func:`redact_text`.
    """
    if "://" not in url:
        return url
    parts3 = _split_userinfo(url)
    if parts3 is not None:
        scheme, user, password, rest = parts3
        if password is not None:
            url = f"{scheme}://{user}:{MASK}@{rest}"
        elif scheme.lower() in _TOKEN_USERINFO_SCHEMES:
            url = f"{scheme}://{MASK}@{rest}"
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


def redact_value(value: str) -> str:
    """A setting declared secret in the config schema (``tune.storage``): as :func:`redact_url`
    for a URL; a value that is not one but holds ``credentials@host`` keeps only what follows
    the last "@"."""
    if "://" in value:
        return redact_url(value)
    if "@" in value:
        return f"{MASK}@{value.rsplit('@', 1)[1]}"
    return value


def _userinfo_in_text(m: re.Match[str]) -> str:
    scheme, user = m.group("scheme"), m.group("user")
    if m.group("colon"):
        return f"{scheme}://{user}:{MASK}@"
    if scheme.lower() in _TOKEN_USERINFO_SCHEMES and user:
        return f"{scheme}://{MASK}@"
    return m.group(0)


def redact_text(text: str) -> str:
    """Free text (a log line, an error message, a tag) with every credential masked: the
    secrets this process knows verbatim, then each ``scheme://user:password@`` (password up to
    the last "@" before the host), then secret query parameters of every URL."""
    if _KNOWN:
        text = _mask_known(text)
    if "://" not in text:
        return text
    text = _USERINFO_TEXT.sub(_userinfo_in_text, text)
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _secret_keys() -> frozenset[str]:
    """The config keys declared secret in the schema (``rima_core.config.secret_keys``)."""

    return secret_keys()


def redact_config(value: Any, _path: str = "") -> Any:
    """A copy of a nested dict/list structure (a ``Config.to_dict()``, a flat params dict, a
    summary) with credentials masked: every setting the config schema declares secret
    (``tune.storage``, found by its dotted path, nested or flat) by :func:`redact_value`, the
    whole value of any string under a key named like a secret (``password``, ``token``), and
    URLs in every other string (:func:`redact_text`)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            path = f"{_path}{key}"
            if isinstance(item, str) and item and is_secret_name(str(key).rsplit(".", 1)[-1]):
                out[key] = MASK
            elif isinstance(item, str) and path in _secret_keys():
                out[key] = redact_text(redact_value(item))
            else:
                out[key] = redact_config(item, f"{path}.")
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
            elif redact_config({path: item}) != {path: item} or (
                redact_config({key: item}) != {key: item}
            ):
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
        remember_environment()  # a credential put in the environment after start-up too
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
