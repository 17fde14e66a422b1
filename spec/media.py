"""Where an image or video comes from: a content part's source key, then a path, URL, data: URL or base64 text.

A vision part names its media with ONE of these keys (the keys transformers' chat templates and qwen-vl-utils read):

    image part:  image | image_url (a str, or OpenAI's {"url": ...}) | url | path | base64
    video part:  video | url | path | base64

Keys whose value is None are ignored. When several keys are given with the SAME value, the first in the order
above wins (so `image` beats `url`, which beats `path`, which beats `base64`; transformers reads them in this
order). When they hold DIFFERENT values the part is ambiguous and is refused (transformers would load each of them
as a separate image and break the placeholder count). A value is then read as:

    "http://..." / "https://..."   fetched (fetch_url: timeout, size limit, bounded redirects)
    "file://..."                   a local file (the rest of the URL, percent-decoded)
    "data:<mime>;base64,..."       decoded in memory
    other str / os.PathLike        a local path (key `base64`: base64 text)
    anything else                  passed on as it is (bytes, PIL image, array, frame list, Video)

Fetched bodies, data: URLs and base64 become bytes, so they are decoded and bomb-checked exactly as files are.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

IMAGE_KEYS = ("image", "image_url", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path", "base64")
# Options a part may carry (qwen-vl-utils' names), besides "type" and its source key.
IMAGE_PART_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_PART_OPTIONS = (
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "resized_height",
    "resized_width",
    "video_start",
    "video_end",
)


@dataclass(frozen=True)
class FetchLimits:
    """Limits for http(s) fetches: seconds per connect/read and for the whole body, body bytes, redirects."""

    timeout: float = 30.0
    max_bytes: int = 512 * 2**20  # 512 MiB: a long 1080p clip fits; a runaway stream does not
    max_redirects: int = 5

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"FetchLimits.timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not (isinstance(self.max_bytes, int) and self.max_bytes > 0):
            raise ValueError(f"FetchLimits.max_bytes must be an int > 0, got {self.max_bytes!r}")
        if not (isinstance(self.max_redirects, int) and self.max_redirects >= 0):
            raise ValueError(f"FetchLimits.max_redirects must be an int >= 0, got {self.max_redirects!r}")


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit):
        super().__init__()
        self.max_redirections = limit
        self.max_repeats = limit  # a loop a -> b -> a is stopped by the same bound

    def http_error_302(self, req, fp, code, msg, headers):
        try:
            return super().http_error_302(req, fp, code, msg, headers)
        except urllib.error.HTTPError as e:
            if "redirect" in str(e.msg).lower():
                raise _TooManyRedirects(f"more than {self.max_redirections} redirects (max_redirects)") from None
            raise

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _TooManyRedirects(Exception):
    pass


def fetch_url(url: str, *, limits: FetchLimits = FetchLimits(), what: str = "media") -> bytes:
    """GET an http(s) URL -> its body (bytes). Any failure is a ValueError that names the URL and why.

    The whole fetch (connect, redirects, body) must finish within limits.timeout seconds; a body larger
    than limits.max_bytes (by Content-Length, or while reading) is refused; at most limits.max_redirects.
    """
    opener = urllib.request.build_opener(_Redirects(limits.max_redirects))
    request = urllib.request.Request(url, headers={"User-Agent": "qwen25vl"})
    deadline = time.monotonic() + limits.timeout
    head = f"{what} URL {url!r} could not be fetched"
    try:
        with opener.open(request, timeout=limits.timeout) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > limits.max_bytes:
                raise ValueError(
                    f"{head}: its Content-Length is {int(size)} bytes, over the limit of {limits.max_bytes} "
                    "(FetchLimits.max_bytes)"
                )
            chunks, total = [], 0
            while chunk := response.read(1 << 16):
                total += len(chunk)
                if total > limits.max_bytes:
                    raise ValueError(
                        f"{head}: the body passed the limit of {limits.max_bytes} bytes (FetchLimits.max_bytes)"
                    )
                if time.monotonic() > deadline:
                    raise ValueError(f"{head}: not complete after {limits.timeout} s (FetchLimits.timeout)")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{head}: the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise ValueError(f"{head}: timed out after {limits.timeout} s (FetchLimits.timeout)") from None
        raise ValueError(f"{head}: {reason} (no network, or the host is unknown or refuses)") from None
    except _TooManyRedirects as e:
        raise ValueError(f"{head}: {e}") from None
    except http.client.HTTPException as e:
        raise ValueError(f"{head}: the server broke the HTTP exchange ({type(e).__name__}: {e})") from None
    except TimeoutError:
        raise ValueError(f"{head}: timed out after {limits.timeout} s (FetchLimits.timeout)") from None
    except OSError as e:
        raise ValueError(
            f"{head}: {type(e).__name__}: {e or 'timed out'} (FetchLimits.timeout {limits.timeout} s)"
        ) from None


def decode_base64(text, *, what: str = "media") -> bytes:
    """Base64 text (str or bytes; a data: URL is accepted too) -> bytes; a bad string is a ValueError."""
    if isinstance(text, str) and text.startswith("data:"):
        return decode_data_url(text, what=what)
    if not isinstance(text, (str, bytes)):
        raise TypeError(f"{what} base64 value must be a str, got {type(text).__name__}")
    compact = "".join(text.split()) if isinstance(text, str) else b"".join(text.split())  # MIME line breaks
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} base64 value ({len(text)} characters) is not valid base64: {e}") from None
    if not data:
        raise ValueError(f"{what} base64 value decodes to 0 bytes")
    return data


def decode_data_url(url: str, *, what: str = "media") -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes (percent-decoded when not base64)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"{what} data: URL {url[:40]!r}... has no ',' between its header and its payload")
    if header.endswith(";base64"):
        return decode_base64(payload, what=what)
    return urllib.parse.unquote_to_bytes(payload)


def resolve(value, *, key: str, kind: str, limits: FetchLimits = FetchLimits()):
    """One source value -> what the image/video loaders take: a local path (str), bytes, or the object itself.

    key: the part key it came from (`base64` reads str as base64 text, `path` never fetches). kind: "image"/"video".
    """
    if key == "base64":
        return decode_base64(value, what=kind)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        return value
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if key == "path":
        return value[len("file://") :] if scheme == "file" else value
    if scheme in ("http", "https"):
        return fetch_url(value, limits=limits, what=kind)
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlparse(value).path)
    if scheme == "data":
        return decode_data_url(value, what=kind)
    if key == "url":
        raise ValueError(
            f"{kind} url {value[:80]!r} must start with http://, https://, file:// or data:; "
            "for a local file use the 'path' key"
        )
    return value


def part_source(part: Mapping, kind: str, where: str) -> tuple[str, object] | None:
    """The (key, value) naming a part's media by the precedence of the module doc; None when it has none."""
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    found = []
    for key in keys:
        value = part.get(key)
        if key == "image_url" and isinstance(value, Mapping):  # OpenAI style {"image_url": {"url": ...}}
            value = value.get("url")
        if value is not None:
            found.append((key, value))
    if not found:
        return None
    for key, value in found[1:]:
        same = value is found[0][1] or (isinstance(value, (str, bytes)) and value == found[0][1])
        if not same:
            raise ValueError(
                f"{where} is ambiguous: it names its {kind} twice, by {found[0][0]!r} and by {key!r}; "
                f"keep one of {', '.join(map(repr, keys))}"
            )
    return found[0]


def part_options(part: Mapping, kind: str, where: str) -> dict:
    """The per-part options of a vision part (qwen-vl-utils' keys); an unknown key is refused by name."""
    allowed = IMAGE_PART_OPTIONS if kind == "image" else VIDEO_PART_OPTIONS
    sources = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    unknown = sorted(str(k) for k in part if k not in allowed and k not in sources and k != "type")
    if unknown:
        raise ValueError(
            f"{where} is {'an image' if kind == 'image' else 'a video'} part with unknown key(s) {unknown}; "
            f"a {kind} part takes 'type', one of {list(sources)} and the options {list(allowed)}"
        )
    return {k: part[k] for k in allowed if part.get(k) is not None}
