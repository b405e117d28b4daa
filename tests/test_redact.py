"""Masking secrets in text that leaves the process: URL credentials and registered values."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from streamwatch.redact import Redactor, redact_url, redact_urls, url_secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:RtspSecret987@10.0.0.5:554/s", "rtsp://admin:***@10.0.0.5:554/s"),
        # Unescaped '@', '/', '#' and '?' in a password: all of it up to the last '@' is masked.
        ("rtsp://admin:p@ss/w#r?d@cam/live", "rtsp://admin:***@cam/live"),
        ("https://ghp_token@github.com/x", "https://***@github.com/x"),
        (
            "https://h/p?token=abc&fps=2&X-Amz-Signature=zz&api%5Fkey=k#frag",
            "https://h/p?token=***&fps=2&X-Amz-Signature=***&api%5Fkey=***#frag",
        ),
        ("rtmp://cams.test/live", "rtmp://cams.test/live"),
        ("https://medium.com/@user", "https://medium.com/@user"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_masks_credentials_only(url: str, shown: str):
    """Passwords, lone user names and secret-looking query values are masked; the rest of the
    URL (scheme, host, port, path, other parameters) stays readable."""
    assert redact_url(url) == shown


def test_url_secrets_are_what_redact_url_masks():
    """`url_secrets` returns exactly the values `redact_url` masks, so they can be registered."""
    url = "rtsp://admin:RtspSecret987@cam/x?sig=abc%2Fdef&fps=1"
    assert set(url_secrets(url)) == {"RtspSecret987", "abc%2Fdef", "abc/def"}
    assert url_secrets("rtmp://cams.test/live") == []


def test_urls_inside_free_text_are_masked():
    """A URL anywhere in a message (quoted, in parentheses, at the end) loses its credentials."""
    text = "cannot open 'rtsp://admin:RtspSecret987@cam/x' (tried rtsp://u:pw2@cam2/y)"
    out = redact_urls(text)
    assert "RtspSecret987" not in out
    assert "pw2" not in out
    assert out == "cannot open 'rtsp://admin:***@cam/x' (tried rtsp://u:***@cam2/y)"


def test_registered_secrets_are_masked_wherever_they_appear():
    """Registered values are masked in any text, also percent-encoded, longest first; values
    shorter than six characters are not registered (they would mask ordinary words)."""
    redact = Redactor([SecretStr("sk-mai-0123456789"), "https://hooks.test/T1/B2/xyz", "abc"])
    redact.add("pass word/1", None)
    text = "key sk-mai-0123456789 at https://hooks.test/T1/B2/xyz, pass%20word%2F1 and abc"
    assert redact(text) == "key *** at ***, *** and abc"
    assert "sk-mai-0123456789" in redact
    assert "abc" not in redact
