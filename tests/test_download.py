"""download() against a real local HTTP server that speaks Range requests."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))  # noqa: E401,E702  (no conftest: tiny.py)

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from gpt_sql.loader import download as dl
from gpt_sql.loader.download import FILES, DownloadError, default_cache_dir, download

SIZE = "124M"
BIG = "model.ckpt.data-00000-of-00001"


class Server:
    """Serves `root` over HTTP on 127.0.0.1; records each request and can misbehave on purpose."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str | None, int]] = []  # (file name, Range header, body bytes sent)
        self.short_by: dict[str, int] = {}  # file name -> bytes to withhold while announcing the full length
        self.ignore_range = False
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def names(self) -> list[str]:
        return [name for name, _, _ in self.requests]

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = server.root / unquote(self.path.lstrip("/"))
                rng = self.headers.get("Range")
                if not path.is_file():
                    server.record(path.name, rng, 0)
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng and not server.ignore_range else 0
                if start >= len(data) and start:
                    server.record(path.name, rng, 0)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:len(data) - server.short_by.get(path.name, 0)]
                server.record(path.name, rng, len(body))
                self.wfile.write(body)

        return Handler

    def record(self, name: str, rng: str | None, sent: int) -> None:
        with self.lock:
            self.requests.append((name, rng, sent))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def files(tmp_path) -> dict[str, bytes]:
    """A fake model directory on the server side; the big file spans several download chunks."""
    content = {name: os.urandom(100 + i) for i, name in enumerate(FILES)}
    content[BIG] = os.urandom(2 * dl.CHUNK + 12345)
    d = tmp_path / "srv" / SIZE
    d.mkdir(parents=True)
    for name, data in content.items():
        (d / name).write_bytes(data)
    return content


@pytest.fixture
def server(tmp_path, files):
    s = Server(tmp_path / "srv")
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def assert_complete(d: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in d.iterdir()) == sorted(files), "no .part files left behind"
    for name, data in files.items():
        assert (d / name).read_bytes() == data, name


def test_download(server, files, cache):
    d = download(SIZE, cache, base_url=server.url, progress=False)
    assert d == cache / SIZE
    assert_complete(d, files)
    assert sorted(server.names()) == sorted(FILES)
    assert all(rng is None for _, rng, _ in server.requests)


def test_download_url_from_env(server, files, cache, monkeypatch):
    monkeypatch.setenv("GPT_SQL_DOWNLOAD_URL", server.url + "/")
    assert_complete(download("124m", cache, progress=False), files)


def test_resume_requests_only_the_remainder(server, files, cache):
    have = dl.CHUNK + 777
    (cache / SIZE).mkdir(parents=True)
    (cache / SIZE / (BIG + ".part")).write_bytes(files[BIG][:have])
    assert_complete(download(SIZE, cache, base_url=server.url, progress=False), files)
    big = [(rng, sent) for name, rng, sent in server.requests if name == BIG]
    assert big == [(f"bytes={have}-", len(files[BIG]) - have)]


def test_resume_when_server_ignores_range(server, files, cache):
    server.ignore_range = True
    (cache / SIZE).mkdir(parents=True)
    (cache / SIZE / (BIG + ".part")).write_bytes(b"stale bytes that must not survive")
    assert_complete(download(SIZE, cache, base_url=server.url, progress=False), files)


def test_part_longer_than_file_starts_over(server, files, cache):
    (cache / SIZE).mkdir(parents=True)
    (cache / SIZE / "hparams.json.part").write_bytes(b"x" * 5000)
    assert_complete(download(SIZE, cache, base_url=server.url, progress=False), files)
    assert [rng for name, rng, _ in server.requests if name == "hparams.json"] == ["bytes=5000-", None]


def test_size_mismatch_detected_then_resumed(server, files, cache):
    server.short_by[BIG] = 1000
    with pytest.raises(DownloadError, match=r"got \d+ of \d+ bytes.*run the download again to resume"):
        download(SIZE, cache, base_url=server.url, progress=False)
    part = cache / SIZE / (BIG + ".part")
    assert part.stat().st_size == len(files[BIG]) - 1000
    assert not (cache / SIZE / BIG).exists()

    server.short_by.clear()
    server.requests.clear()
    assert_complete(download(SIZE, cache, base_url=server.url, progress=False), files)
    assert (BIG, f"bytes={len(files[BIG]) - 1000}-", 1000) in server.requests


def test_complete_files_are_skipped(server, files, cache):
    download(SIZE, cache, base_url=server.url, progress=False)
    server.requests.clear()
    download(SIZE, cache, base_url=server.url, progress=False)
    assert server.requests == []
    # and offline too: nothing needs fetching, so nothing is contacted
    assert_complete(download(SIZE, cache, base_url="http://127.0.0.1:9", progress=False), files)


def test_http_error(server, cache):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(SIZE, cache, base_url=server.url + "/nothing-here", progress=False)


def test_unreachable_fails_fast(cache):
    t = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(SIZE, cache, base_url="http://127.0.0.1:9", progress=False)
    assert time.monotonic() - t < dl.CONNECT_TIMEOUT + 1
    msg = str(info.value)
    assert "\n" not in msg
    assert "cannot reach http://127.0.0.1:9/124M/" in msg and "gpt-sql load" in msg


def test_unknown_size(cache):
    with pytest.raises(DownloadError, match="124M, 355M, 774M, 1558M"):
        download("7B", cache, progress=False)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_SQL_CACHE", str(tmp_path / "models"))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("GPT_SQL_CACHE")
    d = default_cache_dir()
    assert d.name == "models" and "gpt-sql" in d.parts
