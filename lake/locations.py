"""Where things are, as people write them: a path or an fsspec URL, checked before
anything is read or written there (an empty location would mean the current directory),
and the short texts a command records (a promotion's reason)."""

from __future__ import annotations

import os
import re
from typing import Annotated

import fsspec
from pydantic import AfterValidator

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
LONGEST = 4096  # characters in a location; a path segment longer than 255 bytes no file system takes


def check_text(text: str, what: str = "text", longest: int = 2000) -> str:
    """Not empty, not only spaces, no control characters, valid UTF-8, at most `longest`."""
    if not text or not text.strip():
        raise ValueError(f"the {what} is empty")
    if _CONTROL.search(text):
        raise ValueError(f"the {what} {text!r} holds a control character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise ValueError(f"the {what} {text!r} is not valid UTF-8") from None
    if len(text) > longest:
        raise ValueError(f"the {what} is {len(text):,} characters long, more than {longest:,}")
    return text


def check_location(text: str) -> str:
    """A path or fsspec URL: not empty, not only spaces, no control characters, valid
    UTF-8, not too long, a scheme fsspec knows (a plain path is a local one)."""
    if not text or not text.strip():
        raise ValueError("is empty: give a path or a URL (an empty one would mean the current directory)")
    if text != text.strip():
        raise ValueError(f"{text!r} starts or ends with spaces")
    check_text(text, "location", LONGEST)
    if any(len(part.encode("utf-8")) > 255 for part in text.split("/")):
        raise ValueError(f"{text[:60]!r}… has a path segment longer than 255 bytes")
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme is not None and scheme not in fsspec.available_protocols():
        raise ValueError(f"{text!r}: unknown URL scheme {scheme!r} (known: file, s3, memory, gs, az, …)")
    return text


def _local(text: str) -> str | None:
    if "://" in text:
        return text.removeprefix("file://") if text.startswith("file://") else None
    return text


def _not_local(text: str, wrong, says: str) -> str:
    """A location, refused when it is a local path that `wrong` holds true of."""
    check_location(text)
    path = _local(text)
    if path is not None and wrong(path):
        raise ValueError(f"{text} {says}")
    return text


def check_folder(text: str) -> str:
    """A location that holds objects: not a local file."""
    return _not_local(text, os.path.isfile, "is a file, not a folder")


def check_file(text: str) -> str:
    """A location of one file: not a local folder."""
    return _not_local(text, os.path.isdir, "is a folder, not a file")


def check_endpoint(text: str | None) -> str | None:
    if text is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
        raise ValueError(f"an endpoint is an http:// or https:// URL, got {text!r}")
    return text


Location = Annotated[str, AfterValidator(check_location)]
Folder = Annotated[str, AfterValidator(check_folder)]
File = Annotated[str, AfterValidator(check_file)]
