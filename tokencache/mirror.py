"""Downloads through a mirror, and a local mirror server: how the downloads of the workflow are
rehearsed without the internet.

:func:`fetch` is the package's one way to download a file: streamed into a temporary file that is
renamed to the target only when complete (:func:`tokencache.io.write_atomic`) and, where a sha256
is known, only when the digest matches; a transfer that ends before its ``Content-Length`` (Python's
``http.client`` does not notice that by itself when reading in blocks), a refused connection, a
timeout or a server error is retried a few times, and then fails with one line naming the URL.

A *mirror* is a base URL that serves files under their official names plus ``manifest.json``
(``{"files": {name: {"sha256", "size"}}}``). With one set (``--base-url``, or the environment
variable ``TOKENCACHE_MIRROR``, which the workflow sets from the config), the downloads fetch
``BASE/<official file name>`` and check it against the mirror's manifest instead of the official
URL and checksum (:func:`mirror_source`); without one, nothing changes.

:class:`MirrorServer` is such a mirror for a local folder: a threaded HTTP server bound to
127.0.0.1 on a free port, started and stopped cleanly (also as a context manager). Besides the
plain files it answers the Hugging Face hub's file URLs, ``/{owner}/{repo}/resolve/{revision}/{path}``,
with the headers ``huggingface_hub`` reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``), so
``HF_ENDPOINT=<server url>`` makes ``AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")``
download the folder ``<root>/stabilityai/sd-vae-ft-ema/`` as if from the hub.
"""
from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import posixpath
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from tokencache.errors import UserError
from tokencache.io import sha256_file, write_atomic

#: environment variable holding the mirror's base URL (the workflow sets it; `tokencache download` reads it)
MIRROR_ENV = "TOKENCACHE_MIRROR"
#: a mirror's list of files: {"files": {relative path: {"sha256": hex, "size": bytes}}, …}
MANIFEST = "manifest.json"
#: tries of one download before giving up (transient failures only), seconds between tries, and
#: seconds a connection may stay silent
ATTEMPTS = 3
RETRY_PAUSE_S = 0.5
TIMEOUT_S = 60.0
#: HTTP statuses worth another try (the server may be busy or restarting)
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(UserError, RuntimeError):
    """A download that failed; the message is one line naming the URL. ``transient``: another try may succeed."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class _LocalWriteError(Exception):
    """Carries an OSError of the local file out of :func:`stream`'s network error handling."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Hashing:
    """A binary file that also feeds what is written to a hash and counts the bytes."""

    def __init__(self, out, digest) -> None:
        self.out, self.digest, self.written = out, digest, 0

    def write(self, block) -> int:
        self.digest.update(block)
        self.written += len(block)
        return self.out.write(block)


def stream(url: str, out, progress: bool = False, name: Optional[str] = None, timeout: float = TIMEOUT_S) -> int:
    """Copy ``url`` into the open binary file ``out``; return the bytes written.

    A body shorter than the response's ``Content-Length`` raises a transient :class:`DownloadError`
    (``http.client`` returns a short read silently when reading in blocks).
    """
    from tqdm import tqdm

    written = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=name or posixpath.basename(url),
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    try:
                        out.write(block)
                    except OSError as exc:  # the local disk (full, read-only): not the transfer's fault
                        raise _LocalWriteError(exc) from None
                    written += len(block)
                    bar.update(len(block))
    except _LocalWriteError as exc:
        raise exc.error from None
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}",
                            transient=exc.code in TRANSIENT_STATUS) from None
    except ValueError as exc:  # not a URL urllib can open: another try cannot help
        raise DownloadError(f"cannot download {url}: {_reason(exc)}") from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, a broken response
        raise DownloadError(f"cannot download {url}: {_reason(exc)}", transient=True) from None
    if total and written != total:
        raise DownloadError(f"cannot download {url}: transfer cut short after {written} of {total} bytes",
                            transient=True)
    return written


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = " ".join(str(reason).split())
    return text or type(exc).__name__


def fetch(url: str, target: str | os.PathLike, sha256: Optional[str] = None, attempts: int = ATTEMPTS,
          progress: bool = False, timeout: float = TIMEOUT_S,
          stream_fn: Optional[Callable[..., object]] = None) -> str:
    """Download ``url`` to ``target`` atomically; return the file's hex sha256.

    ``sha256``: the full hex digest, or its first 8+ hex digits (torch.hub's file-name convention);
    a mismatch fails before the rename, so the target never holds a wrong file. Transient failures
    are tried ``attempts`` times; every failure leaves neither the target nor a temporary file and
    is one :class:`DownloadError` line naming the URL. ``stream_fn(url, out, progress, name)``
    replaces :func:`stream` (the checkpoint downloader passes its own).
    """
    target = Path(target)
    expected = sha256.lower() if sha256 else None

    def attempt() -> str:
        digest = hashlib.sha256()

        def write(out):
            hashed = _Hashing(out, digest)
            if stream_fn is None:
                stream(url, hashed, progress, target.name, timeout)
            else:
                stream_fn(url, hashed, progress, target.name)
            if expected and not digest.hexdigest().startswith(expected):
                raise DownloadError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {expected}; "
                                    f"the file was not kept (check the source or its checksum)")

        write_atomic(target, format=write)
        return digest.hexdigest()

    return retried(attempt, attempts)


def retried(action: Callable[[], object], attempts: int = ATTEMPTS):
    """``action()``, tried again after a transient :class:`DownloadError` (a transfer cut short, a
    timeout) with a growing pause, ``attempts`` times in all; then one line naming the count."""
    last: Optional[DownloadError] = None
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return action()
        except DownloadError as exc:
            if not exc.transient:
                raise
            last = exc
            if attempt < attempts:
                time.sleep(RETRY_PAUSE_S * attempt)
    raise DownloadError(f"{last} (tried {attempts} times)")


# --------------------------------------------------------------------------- mirrors


def mirror_url(base_url: Optional[str] = None) -> Optional[str]:
    """The mirror to download from: ``base_url`` if given, else ``$TOKENCACHE_MIRROR``, else None."""
    url = base_url or os.environ.get(MIRROR_ENV, "").strip() or None
    return url.rstrip("/") if url else None


def read_manifest(base_url: str, timeout: float = TIMEOUT_S) -> dict:
    """The mirror's ``manifest.json`` (``{"files": {name: {"sha256", "size"}}}``), read into memory."""
    url = f"{base_url.rstrip('/')}/{MANIFEST}"

    class _Buffer:
        def __init__(self):
            self.parts = []

        def write(self, block):
            self.parts.append(bytes(block))

    buffer = _Buffer()

    def attempt() -> None:
        buffer.parts.clear()
        stream(url, buffer, timeout=timeout)

    retried(attempt)
    try:
        manifest = json.loads(b"".join(buffer.parts))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DownloadError(f"{url} is not a mirror manifest (a JSON object with a \"files\" mapping)") from None
    return manifest


def mirror_source(url: str, sha256: Optional[str] = None, base_url: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(URL, sha256) to download the file of official URL ``url`` from.

    Without a mirror (``base_url`` or ``$TOKENCACHE_MIRROR``) that is ``(url, sha256)`` unchanged;
    with one, ``BASE/<file name of url>`` and the sha256 in the mirror's manifest (one line if the
    mirror does not hold the file).
    """
    base = mirror_url(base_url)
    if base is None:
        return url, sha256
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    entry = read_manifest(base)["files"].get(name)
    if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
        raise DownloadError(f"the mirror {base} has no {name} in its {MANIFEST} (with a sha256): add it there, "
                            f"or unset the mirror ({MIRROR_ENV} / downloads_base_url) to use {url}")
    return f"{base}/{urllib.parse.quote(name)}", entry["sha256"]


def write_manifest(folder: str | os.PathLike, extra: Optional[dict] = None) -> dict:
    """Write ``folder/manifest.json`` listing every file under ``folder`` (sorted paths; sha256, size)."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {**(extra or {}), "files": files}
    write_atomic(folder / MANIFEST, manifest, format="json")
    return manifest


# --------------------------------------------------------------------------- the local server

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the files under the server's root, plainly or by the hub's resolve URLs."""

    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        self.server.requests.append(f"{self.command} {self.path}")

    def _file(self) -> tuple[Optional[Path], dict]:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        headers = {}
        match = _RESOLVE.match(path)
        if match:
            repo = match["repo"]
            headers["X-Repo-Commit"] = self.server.commit_of(repo)
            path = f"/{repo}/{match['path']}"
        rel = posixpath.normpath(path).lstrip("/")
        if not rel or rel.startswith("..") or any(part.startswith(".") for part in rel.split("/")):
            return None, headers
        file = self.server.root / rel
        return (file if file.is_file() else None), headers

    def _answer(self, body: bool) -> None:
        file, headers = self._file()
        if file is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = file.stat().st_size
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("ETag", f'"{self.server.sha256_of(file)}"')
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if body:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    self.wfile.write(block)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, root: Path) -> None:
        super().__init__(address, handler)
        self.root = root
        self.requests: list[str] = []
        self._digests: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def sha256_of(self, file: Path) -> str:
        st = file.stat()
        key = (str(file), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key not in self._digests:
                self._digests[key] = sha256_file(file)
            return self._digests[key]

    def commit_of(self, repo: str) -> str:
        """A 40-hex "commit" of a repository folder: sha1 over its files' names and sha256 (stable)."""
        folder = self.root / repo
        digest = hashlib.sha1()
        if folder.is_dir():
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
                digest.update(self.sha256_of(path).encode() + b"\0")
        return digest.hexdigest()


class MirrorServer:
    """An HTTP mirror of the folder ``root`` on 127.0.0.1 (a free port unless ``port`` is given).

    ``start()`` binds and serves from a daemon thread and returns the base URL (``url``);
    ``stop()`` shuts it down and closes the socket (idempotent). ``with MirrorServer(root) as url:``
    does both. ``requests`` lists the requests served (``"GET /path"``), for tests and logs.
    """

    def __init__(self, root: str | os.PathLike, port: int = 0) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"mirror folder {self.root} does not exist")
        self.port = port
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> Optional[str]:
        return None if self._server is None else f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        return [] if self._server is None else list(self._server.requests)

    def start(self) -> str:
        if self._server is None:
            self._server = _Server(("127.0.0.1", self.port), _Handler, self.root)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="tokencache-mirror", daemon=True)
            self._thread.start()
        return self.url

    def stop(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
