"""Error texts fit to store in shards and stats: they never quote the bytes a server sent."""

from __future__ import annotations

import re
from http import HTTPStatus

from d3builder.imaging.inspection import error_text

_HTTP_ERROR = re.compile(r"^HTTP Error (\d{3})\b")
_KNOWN_SHAPES = re.compile(
    r"^(<urlopen error .*>|\[Errno -?\d+\] .*|.*timed out|Remote end closed connection without response"
    r"|IncompleteRead\(\d+ bytes read(, \d+ more expected)?\)|got more than \d+ bytes when reading .*"
    r"|Use of image disallowed by X-Robots-Tag directive|unknown url type: .*|nonnumeric port: .*"
    r"|URL can't contain control characters\. .*|img2dataset wrote no row for this record)$",
    re.S,
)
"""Messages img2dataset's urllib downloader produces from local state (socket, TLS, URL), never from a response."""


def download_error_text(message: str) -> str:
    """img2dataset's error for one URL, fit to store.

    An HTTP error keeps its status code and the standard phrase (not the server's); a message of a known
    local shape is kept; anything else (e.g. http.client's BadStatusLine, which is the response's first
    line) is withheld.
    """
    status = _HTTP_ERROR.match(message)
    if status:
        code = int(status.group(1))
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "non-standard status"
        return f"HTTP Error {code}: {phrase}"
    if _KNOWN_SHAPES.match(message.strip()):
        return error_text(message.strip())
    return "download failed: unrecognised error (withheld: it may quote the server's response)"
