"""Database URLs: parsing and redaction. A password never reaches a log, an error or output."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_PASSWORD_IN_URL = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]+@")
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact(url: str) -> str:
    """Return ``url`` with its password (userinfo or ``password=`` parameter) masked."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo and userinfo.split(":", 1)[1]:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = _PASSWORD_PARAM.sub(r"\1***", parts.query)
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        # Not urlunsplit: it drops the "//" of an empty host (postgresql:///db?host=/run/...).
        shown = f"{parts.scheme}://{netloc}{parts.path}"
        if query:
            shown += "?" + query
        if parts.fragment:
            shown += "#" + parts.fragment
        return shown
    except ValueError:
        return scrub(url)


def scrub(text: str, *secrets: str) -> str:
    """Mask URL passwords and the given secret strings anywhere in ``text``."""
    text = _PASSWORD_IN_URL.sub(r"\1***@", text)
    text = _PASSWORD_PARAM.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def password_of(url: str) -> str | None:
    """The password in ``url``, if any (used to scrub driver messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return parts.password
    match = re.search(r"password=([^&\s]*)", parts.query, re.IGNORECASE)
    return match.group(1) if match else None
