"""Fetch a file from mirrors: retries, checksums, and time bounds whatever the server does.

Three environment variables set the bounds (seconds, bytes per second):

- ``SCT_DEEPSEG_EPI_DOWNLOAD_TIMEOUT`` (default 1800): the whole download, every mirror
  and retry included;
- ``SCT_DEEPSEG_EPI_DOWNLOAD_STALL`` (default 30): the longest wait for the next byte;
- ``SCT_DEEPSEG_EPI_DOWNLOAD_MIN_RATE`` (default 10000; 0 disables): the lowest average
  rate over any ``SCT_DEEPSEG_EPI_DOWNLOAD_RATE_WINDOW`` seconds (default 30).

Only http(s)://, file:// URLs and local paths are fetched; anything else, and a malformed
``#sha256=`` fragment, is refused before the first byte.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from ..errors import DownloadError
from .store import sha256_file

CONNECT_TIMEOUT = 10.0
RETRIES = 3
BACKOFF = 1.0
CHUNK = 1 << 16
SCHEMES = ("http", "https", "file")
SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Limits:
    """Time bounds of one download (see the module docstring for the variables that set them)."""

    deadline: float = 1800.0
    stall: float = 30.0
    min_rate: float = 10_000.0
    rate_window: float = 30.0

    @classmethod
    def from_env(cls) -> "Limits":
        values = {}
        for field_name, var in (("deadline", "TIMEOUT"), ("stall", "STALL"), ("min_rate", "MIN_RATE"),
                                ("rate_window", "RATE_WINDOW")):
            text = os.environ.get(f"SCT_DEEPSEG_EPI_DOWNLOAD_{var}")
            if text is None or not text.strip():
                continue
            try:
                v = float(text)
            except ValueError:
                v = -1.0
            if not v >= 0 or (v == 0 and field_name != "min_rate"):
                raise DownloadError(f"SCT_DEEPSEG_EPI_DOWNLOAD_{var}={text!r}: expected a positive number")
            values[field_name] = v
        return cls(**values)


def split_checksum(text: str) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` -> (URL, hex) checked before anything is fetched; no fragment -> (URL, None)."""
    base, sep, frag = text.partition("#")
    if not sep or ("://" not in base and not frag.startswith("sha256=")):
        return text, None  # a local path may contain '#'
    if not frag.startswith("sha256="):
        raise DownloadError(f"{text}: unknown fragment #{frag}; the only one understood is #sha256=HEX")
    sha = frag[len("sha256="):]
    if not SHA_RE.match(sha):
        raise DownloadError(f"{text}: #sha256= must be followed by 64 hexadecimal digits")
    return base, sha.lower()


def check_url(url: str) -> None:
    """Refuse a URL whose scheme cannot be fetched, before any attempt (ftp:// is not retried)."""
    if "://" in url and urlparse(url).scheme.lower() not in SCHEMES:
        raise DownloadError(f"{url}: unsupported URL scheme; use http://, https://, file:// or a local path")


def _progress(total: int | None, label: str):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)
    return None


def fetch(urls: Sequence[str], dest: Path, sha256: str | None = None, *, retries: int | None = None,
          backoff: float | None = None, limits: Limits | None = None) -> Path:
    """Download the first mirror that works to ``dest``, verifying ``sha256`` when given.

    Each mirror is tried ``retries`` times with exponential backoff on connection errors,
    timeouts and 5xx answers; 4xx answers and checksum mismatches move to the next mirror.
    ``limits`` (default: from the environment) bound the whole call, a stall and the rate.
    """
    import requests
    from urllib3.exceptions import HTTPError as Urllib3Error

    retries = RETRIES if retries is None else retries
    backoff = BACKOFF if backoff is None else backoff
    limits = Limits.from_env() if limits is None else limits
    for url in urls:
        check_url(url)
    end = time.monotonic() + limits.deadline
    dest = Path(dest)
    errors: list[str] = []
    for url in urls:
        if url.startswith("file://") or "://" not in url:
            src = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
            try:
                fsrc = open(src, "rb")
            except OSError as exc:
                errors.append(f"{url}: {exc.strerror or exc}")
                continue
            with fsrc, open(dest, "wb") as fdst:  # a write error (full disk) is not this mirror's fault: raised
                shutil.copyfileobj(fsrc, fdst, CHUNK)
            if sha256 and sha256_file(dest) != sha256:
                errors.append(f"{url}: SHA-256 mismatch")
                dest.unlink()
                continue
            return dest
        for attempt in range(retries):
            if attempt:
                time.sleep(min(backoff * 2 ** (attempt - 1), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                errors.append(f"{url}: gave up after the {limits.deadline:g} s download deadline")
                break
            try:
                with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT, limits.stall)) as r:
                    if r.status_code >= 500:
                        errors.append(f"{url}: HTTP {r.status_code}")
                        continue
                    if r.status_code != 200:
                        errors.append(f"{url}: HTTP {r.status_code}")
                        break
                    total = int(r.headers.get("Content-Length") or 0) or None
                    size, digest = _stream(r, dest, total, limits, end, url)
                if total is not None and size != total:
                    errors.append(f"{url}: connection closed after {size} of {total} bytes")
                    continue
                if sha256 and digest != sha256:
                    errors.append(f"{url}: SHA-256 {digest[:12]}... does not match {sha256[:12]}...")
                    break
                return dest
            except _TooSlow as exc:
                errors.append(str(exc))
                break  # the same server is not retried: it would be as slow again
            except (requests.RequestException, Urllib3Error) as exc:  # the body is read from urllib3 directly
                errors.append(f"{url}: {type(exc).__name__}")
    if dest.exists():
        dest.unlink()
    raise DownloadError("download failed from every mirror: " + "; ".join(errors or ["no URL given"]))


class _TooSlow(Exception):
    """A download ran past the deadline or below the minimum rate."""


def _stream(r, dest: Path, total: int | None, limits: Limits, end: float, url: str) -> tuple[int, str]:
    """Write a response body to ``dest`` while checking the deadline and the rate after every read.

    ``read1`` returns whatever has arrived (waiting at most the stall timeout), so a server
    that trickles one byte at a time cannot hold a read open past the checks: a download
    ends at most one stall timeout after its deadline.
    """
    read1 = getattr(r.raw, "read1", None)
    read = ((lambda: read1(CHUNK, decode_content=True)) if read1 is not None  # urllib3 >= 2
            else (lambda: r.raw.read(4096, decode_content=True)))
    bar = _progress(total, dest.name)
    h = hashlib.sha256()
    size = 0
    window_start, window_bytes = time.monotonic(), 0
    try:
        with open(dest, "wb") as f:
            while True:
                block = read()
                if not block:
                    break
                f.write(block)
                h.update(block)
                size += len(block)
                window_bytes += len(block)
                if bar is not None:
                    bar.update(len(block))
                now = time.monotonic()
                if now >= end:
                    raise _TooSlow(f"{url}: not finished within the {limits.deadline:g} s download deadline "
                                   f"({size} bytes received; SCT_DEEPSEG_EPI_DOWNLOAD_TIMEOUT sets it)")
                if now - window_start >= limits.rate_window:
                    rate = window_bytes / (now - window_start)
                    if rate < limits.min_rate:
                        raise _TooSlow(f"{url}: {rate:.0f} bytes/s over {now - window_start:.0f} s, below the minimum "
                                       f"of {limits.min_rate:g} (SCT_DEEPSEG_EPI_DOWNLOAD_MIN_RATE sets it)")
                    window_start, window_bytes = now, 0
    finally:
        if bar is not None:
            bar.close()
    return size, h.hexdigest()
