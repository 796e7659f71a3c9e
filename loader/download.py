"""Fetch OpenAI's published GPT-2 checkpoints, resumably, into a local cache.

Only the standard library does the HTTP: files go to `NAME.part`, are resumed with a Range request
after an interruption, checked against the size the server announced, then renamed into place, so a
file under its final name is always complete and is never fetched again.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

SIZES = ("124M", "355M", "774M", "1558M")
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
         "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
URL_ENV = "GPT_SQL_DOWNLOAD_URL"
CACHE_ENV = "GPT_SQL_CACHE"
CONNECT_TIMEOUT = 5.0  # seconds; offline we want to fail fast
READ_TIMEOUT = 60.0  # seconds without a byte before giving up on a slow transfer
CHUNK = 1 << 20
OFFLINE_HINT = "no network? Download the files elsewhere and run `gpt-sql load DIR`"


class DownloadError(Exception):
    """A download failed; the one-line message says what and what to do."""


def default_cache_dir() -> Path:
    """Where downloaded models live: $GPT_SQL_CACHE, else the per-user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("gpt-sql")) / "models"


# urllib has one timeout for connecting and reading; these connections use a short one to connect,
# then a longer one for the transfer so that a slow but live server is not cut off.
class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(READ_TIMEOUT)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(READ_TIMEOUT)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self._context)


_opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def _base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def _normalize_size(size: str) -> str:
    for s in SIZES:
        if size.strip().upper() == s:
            return s
    raise DownloadError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(SIZES)}")


def _open(url: str, start: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "gpt-sql"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return _opener.open(urllib.request.Request(url, headers=headers), timeout=CONNECT_TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # our .part is already as long as (or longer than) the file
            return e  # type: ignore[return-value]
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the model size and download URL") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url} ({reason}): {OFFLINE_HINT}") from None
    except ValueError as e:
        raise DownloadError(f"invalid download URL {url} ({e}); check {URL_ENV} or the base URL") from None


def _total_size(resp: http.client.HTTPResponse, start: int) -> int | None:
    """The full file size the server announced, from Content-Range (206) or Content-Length (200)."""
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != start:
            raise DownloadError(f"{resp.url}: server answered the resume request with a bad Content-Range; "
                                "delete the .part file and retry")
        return int(m.group(2))
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def _copy(resp: http.client.HTTPResponse, out: BinaryIO, bar: tqdm, url: str) -> None:
    try:
        while chunk := resp.read(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: transfer interrupted ({e}); run the download again to resume") from None


def _fetch(url: str, dest: Path, progress: bool) -> None:
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    resp = _open(url, start)
    if resp.status == 416:
        # can't tell whether the .part is complete or garbage: start over once
        resp.close()
        part.unlink()
        start = 0
        resp = _open(url, 0)
    with resp:
        if resp.status != 206:
            start = 0  # the server ignored the Range header and sends the whole file
        total = _total_size(resp, start)
        show = progress and sys.stderr.isatty()
        with part.open("ab" if start else "wb") as out, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=dest.name, disable=not show, leave=False) as bar:
            _copy(resp, out, bar, url)
    got = part.stat().st_size
    if total is not None and got != total:
        if got > total:
            part.unlink()
            raise DownloadError(f"{url}: got {got} bytes but the server announced {total}; run the download again")
        raise DownloadError(f"{url}: got {got} of {total} bytes (connection dropped?); "
                            "run the download again to resume")
    os.replace(part, dest)


def download(size: str, cache_dir: Path, base_url: str | None = None, progress: bool = True) -> Path:
    """Fetch GPT-2 `size` (124M, 355M, 774M or 1558M) into `cache_dir/size`, returning that directory."""
    size = _normalize_size(size)
    base = _base_url(base_url)
    dest_dir = Path(cache_dir).expanduser() / size
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest_dir} ({e.strerror}); set {CACHE_ENV} to a writable directory") \
            from None
    for name in FILES:
        dest = dest_dir / name
        if dest.exists():
            continue
        _fetch(f"{base}/{size}/{name}", dest, progress)
    return dest_dir
