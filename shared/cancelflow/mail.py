"""What the notification service and the SMTP sink both read of a raw message."""

from __future__ import annotations

import re

_HEADERS_END = re.compile(rb"\r?\n\r?\n")


def header_block(raw: bytes) -> bytes:
    """The message's header lines, without the blank line and body after them (the whole message
    when it has no body). Reading headers from this instead of the whole message keeps a header
    parser or search off the body."""
    end = _HEADERS_END.search(raw)
    return raw[:end.start()] if end else raw
