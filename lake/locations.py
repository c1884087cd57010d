"""Where things are, as people write them: a path or an fsspec URL, checked before
anything is read or written there (an empty location would mean the current directory)."""

from __future__ import annotations

import re
from typing import Annotated

import fsspec
from pydantic import AfterValidator

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_location(text: str) -> str:
    """A path or fsspec URL: not empty, not only spaces, no control characters, a scheme
    fsspec knows (a plain path is a local one)."""
    if not text or not text.strip():
        raise ValueError("is empty: give a path or a URL (an empty one would mean the current directory)")
    if text != text.strip():
        raise ValueError(f"{text!r} starts or ends with spaces")
    if _CONTROL.search(text):
        raise ValueError(f"{text!r} holds a control character")
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme is not None and scheme not in fsspec.available_protocols():
        raise ValueError(f"{text!r}: unknown URL scheme {scheme!r} (known: file, s3, memory, gs, az, …)")
    return text


def check_endpoint(text: str | None) -> str | None:
    if text is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
        raise ValueError(f"an endpoint is an http:// or https:// URL, got {text!r}")
    return text


Location = Annotated[str, AfterValidator(check_location)]
