"""Credentials in endpoint URLs (S3, GCS, SageMaker, Vertex): refused in settings, never
shown in messages.

An S3 `endpoint_url` of the form `http://user:password@host` cannot work (aiohttp
refuses URL credentials next to the signed Authorization header: every delivery would
fail, and be retried), and in any URL setting the password would reach error text and
logs. The same goes for the GCS `api_root`. Settings reject it when the config loads;
messages that quote a URL pass it through `without_userinfo` all the same (the GCS
emulator address also comes from the environment).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic_core import PydanticCustomError, ValidationError

__all__ = ["reject_userinfo", "without_userinfo"]

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"'<>]*@")


def without_userinfo(text: str) -> str:
    """`text` with the `user:password@` part of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


def reject_userinfo(value: str | None, field: str, fix: str) -> str | None:
    """A settings validator: `value` unchanged, or an error naming `field` and `fix`.

    The error is raised as a ValidationError of its own so that its `input` (which the
    config loader shows next to the message) is the URL without the password.
    """
    if value is None:
        return None
    try:
        netloc = urlsplit(value).netloc
    except ValueError:
        return value  # not a URL at all: the client reports that
    if "@" not in netloc:
        return value
    raise ValidationError.from_exception_data(
        field,
        [{
            "type": PydanticCustomError(
                "url_userinfo",
                "{field} must not hold a user name or password (user:password@host); "
                "{fix}",
                {"field": field, "fix": fix},
            ),
            "loc": (),
            "input": without_userinfo(value),
        }],
    )
