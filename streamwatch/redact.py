"""Keep secrets out of text that leaves the process: log lines, errors, events, alerts, the
status API and command output.

`redact_url()` hides the credentials a URL carries: the password of its user info (a user name
alone is hidden too: it is often a token) and the values of query parameters whose names look
secret (``token``, ``key``, ``sig``, ``password``…). `redact_urls()` does that to every URL
inside free text, such as MAVI's error messages or an exception's text. A `Redactor` also
replaces known secret values registered with it (the API key, callback secret, status token,
sink URLs, stream passwords), wherever they appear. Nothing here imports the rest of
streamwatch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

from pydantic import SecretStr

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "Redactor",
    "looks_secret",
    "redact_url",
    "redact_urls",
    "url_secrets",
]

MASK = "***"
# Shorter values are not searched for in free text: "1234" would mask every number in a log.
MIN_SECRET_LENGTH = 6

# A URL inside text: scheme://, then anything up to white space, a quote or a bracket.
_URL_IN_TEXT = re.compile(r"""\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s'"<>`]+""")
# Names of query parameters (and environment variables) whose values are credentials.
_SECRET_NAME = re.compile(
    r"(?i)token|key|secret|pass|pwd|sig|auth|credential|session|cookie|private|bearer"
)


def looks_secret(name: str) -> bool:
    """True if a parameter or variable named `name` probably holds a credential."""
    return _SECRET_NAME.search(name) is not None


def _credentials(url: str) -> tuple[list[str], str]:
    """The credentials in `url` (user info and secret-looking query values), and `url` with
    each of them masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return [], url
    found: list[str] = []
    # People write passwords unescaped ("user:p@ss/w#rd@host"): after "user:", everything up
    # to the last '@' is the password. A lone user name before '@' is often a token.
    user, colon, after = rest.partition(":")
    head, at, host = rest.partition("@")
    if colon and "@" in after and not any(c in user for c in "/?#@"):
        password, _, host = after.rpartition("@")
        found.append(password)
        rest = f"{user}:{MASK}@{host}"
    elif at and head and not any(c in head for c in ":/?#"):
        found.append(head)
        rest = f"{MASK}@{host}"
    path, q, query = rest.partition("?")
    if q:
        query, hash_, fragment = query.partition("#")
        parts = []
        for item in query.split("&"):
            name, eq, value = item.partition("=")
            if eq and looks_secret(unquote(name)):
                found.extend(v for v in {value, unquote(value)} if v)
                item = f"{name}={MASK}"
            parts.append(item)
        rest = f"{path}?{'&'.join(parts)}{hash_}{fragment}"
    return found, f"{scheme}://{rest}"


def redact_url(url: str) -> str:
    """`url` with its password (or a lone user name) and its secret-looking query values
    replaced by ``***``; anything that is not a URL comes back unchanged."""
    return _credentials(url)[1]


def url_secrets(url: str) -> list[str]:
    """The values `redact_url` masks in `url`, to be registered with a `Redactor`."""
    return _credentials(url)[0]


def redact_urls(text: str) -> str:
    """Every URL inside `text` passed through `redact_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


class Redactor:
    """Masks registered secret values and URL credentials in text. Callable: ``r(text)``.

    Values shorter than `MIN_SECRET_LENGTH` are not registered (they would mask ordinary
    words and numbers); the URL rules still apply to them."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *values: str | SecretStr | None) -> None:
        """Register more secret values (e.g. a stream URL's password after a reload)."""
        for value in values:
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            if not text:
                continue
            text = text.strip()
            for form in {text, quote(text, safe="")}:
                if len(form) >= MIN_SECRET_LENGTH:
                    self._secrets.add(form)
        if self._secrets:
            # Longest first, so that a URL holding a token is masked whole.
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def __contains__(self, text: str) -> bool:
        """True if `text` holds a registered secret value."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return redact_urls(text)
