"""Slides in object stores (``s3://``, ``gs://``, any fsspec URL), read in place.

A slide URL is checked before anything is fetched (:func:`parse_slide_url`): credentials or signatures in
the URL are refused (URLs go into logs, reports and cube attributes), and so are protocols fsspec does not
know or whose backend (s3fs, gcsfs) is not installed. The object is then read with byte-range requests
through :class:`RangeFile`, a file object over an fsspec file opened without read-ahead: each ``read()`` is
one range request for exactly the bytes asked for, and what it returns is counted, per process and per
URL (:func:`read_stats`). Only while a TIFF's header and IFDs are parsed are small reads served from
64 KiB blocks fetched once (:meth:`RangeFile.coalesced`), so opening a slide takes a few requests, not
one per tag. Credentials come from the environment through the fsspec backend (``AWS_*``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``) and are never part of a message.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import HistoSGEError, InputNotFoundError, ObjectStoreError, SlideFormatError, UsageError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

#: While a TIFF's structure is parsed, reads up to this size are served from aligned blocks of
#: ``COALESCE_BLOCK`` bytes (tag entries and values are a few bytes each, scattered over the IFDs).
COALESCE_MAX_READ = 16 << 10
COALESCE_BLOCK = 64 << 10

#: The fsspec backend each protocol needs, and the extra of this package that installs it.
_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}

#: Query parameters that carry a credential (presigned S3/GCS URLs, SAS tokens, API keys).
_SECRET_QUERY = re.compile(r"signature|credential|token|secret|password|key|^sig$|^sv$|^se$", re.I)

#: Where each protocol's credentials come from (named in messages).
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL for a non-AWS endpoint",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
}


def is_url(value: object) -> bool:
    """Whether ``value`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(value, (str, SlideURL)) and bool(_URL.match(str(value)))


@dataclass(frozen=True)
class SlideURL:
    """A checked slide URL (see :func:`parse_slide_url`) with the views of a path that messages and output
    names use: ``name`` is the object's basename, ``stem`` and ``suffix`` come from it."""

    url: str

    def __str__(self) -> str:
        return self.url

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def resolve(self) -> SlideURL:
        return self

    def is_dir(self) -> bool:
        return False


def _redacted(value: str) -> str:
    """``value`` without user:password@ and without its query: what a message may show."""
    parts = urlsplit(value)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{host}{parts.path}{'?***' if parts.query else ''}"


def credentials_hint(protocol: str) -> str:
    key = {"s3a": "s3", "gcs": "gs"}.get(protocol, protocol)
    return _CREDENTIALS.get(key, f"the environment variables or config files the {protocol}:// backend reads")


def parse_slide_url(value: str | SlideURL) -> SlideURL:
    """``value`` as a :class:`SlideURL`, or a one-line :class:`UsageError` (exit 2) naming the fix: credentials
    or a signature in the URL, an unknown protocol, a protocol whose fsspec backend is not installed, or a
    URL that names no object. Nothing is fetched."""
    if isinstance(value, SlideURL):
        return value
    parts = urlsplit(value)
    protocol = parts.scheme.lower()
    if "@" in parts.netloc:
        raise UsageError(
            f"{_redacted(value)}: the URL holds credentials (user:password@); remove them and set them in the "
            f"environment ({credentials_hint(protocol)}): URLs are written to logs, reports and cube attributes"
        )
    secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_QUERY.search(k)]
    if secret:
        raise UsageError(
            f"{_redacted(value)}: the URL's query holds a credential ({secret[0]}; a presigned or signed URL); use "
            f"the plain {protocol}:// URL with credentials from the environment ({credentials_hint(protocol)})"
        )
    _require_backend(value, protocol)
    if not parts.netloc or not PurePosixPath(parts.path).name or parts.path.endswith("/"):
        raise UsageError(f"{value}: names no object (give {protocol}://bucket/path/to/slide.svs)")
    return SlideURL(value)


def _require_backend(url: str, protocol: str) -> None:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise UsageError(
            f"{url}: unknown protocol {protocol}://; give a local path or an object-store URL (s3://bucket/key, "
            "gs://bucket/key)"
        ) from None
    except ImportError as exc:
        package, extra = _BACKENDS.get(protocol, ("", ""))
        fix = f"pip install {package} (or pip install 'wsi-histosge[{extra}]')" if package else str(exc)
        raise UsageError(f"{url}: reading {protocol}:// URLs needs a package that is not installed: {fix}") from None


def store_error(url: SlideURL, exc: BaseException) -> HistoSGEError:
    """The error to raise for ``exc``, raised by the fsspec backend while reading ``url``: a missing object is
    :class:`InputNotFoundError` (exit 3), refused access or an unreachable store :class:`ObjectStoreError`
    (exit 16); each message names the URL and the fix."""
    if isinstance(exc, HistoSGEError):
        return exc
    what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return InputNotFoundError(f"{url}: no such object ({what}); check the bucket and the key")
    if isinstance(exc, PermissionError) or "Credential" in name or "AccessDenied" in str(exc):
        return ObjectStoreError(
            f"{url}: the object store refused access ({what}); set credentials in the environment "
            f"({credentials_hint(url.protocol)}) and check that they may read this object"
        )
    return ObjectStoreError(
        f"{url}: reading from the object store failed ({what}); check the endpoint and the network, then rerun "
        "(runs resume)"
    )


# -- counting ------------------------------------------------------------------------------------
@dataclass
class ReadStats:
    """What this process has read of one object: bytes returned by range reads, requests, object size."""

    bytes: int = 0
    requests: int = 0
    size: int | None = None


_STATS: dict[str, ReadStats] = {}
_STATS_LOCK = threading.Lock()


def _stats(url: SlideURL) -> ReadStats:
    with _STATS_LOCK:
        return _STATS.setdefault(url.url, ReadStats())


def read_stats(url: SlideURL) -> ReadStats:
    """A copy of what this process has read of ``url`` so far (every :class:`RangeFile` on it counts)."""
    s = _stats(url)
    with _STATS_LOCK:
        return ReadStats(s.bytes, s.requests, s.size)


def _count(url: SlideURL, n: int) -> None:
    s = _stats(url)
    with _STATS_LOCK:
        s.bytes += n
        s.requests += 1


# -- reading -------------------------------------------------------------------------------------
class RangeFile:
    """A read-only, seekable file object over one object (what tifffile reads from): every ``read()`` is one
    range request for exactly the bytes asked for, counted in :func:`read_stats`."""

    mode = "rb"

    def __init__(self, url: SlideURL) -> None:
        from fsspec.core import url_to_fs

        self.url = url
        self.name = url.name
        try:
            # A filesystem of its own, made from the environment as it is now: fsspec's instance cache would hand
            # back one made earlier in this process (another endpoint, credentials since rotated or removed).
            fs, path = url_to_fs(url.url, skip_instance_cache=True)
            try:
                self._f = fs.open(path, "rb", cache_type="none")  # no read-ahead: a read fetches what it asks
            except TypeError:  # a backend whose open takes no cache_type
                self._f = fs.open(path, "rb")
            self.size = int(self._f.size)
        except Exception as exc:
            raise store_error(url, exc) from None
        self._pos = 0
        self._blocks: dict[int, bytes] | None = None
        self._lock = threading.RLock()
        _stats(url).size = self.size

    # -- the file protocol ---------------------------------------------------------------------
    def read(self, n: int | None = -1) -> bytes:
        with self._lock:
            start = self._pos
            end = self.size if n is None or n < 0 else min(self.size, start + n)
            if end <= start:
                return b""
            if self._blocks is not None and end - start <= COALESCE_MAX_READ:
                data = self._from_blocks(start, end)
            else:
                data = self._fetch(start, end)
            self._pos = start + len(data)
            return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._lock:
            base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
            if base + offset < 0:
                raise ValueError(f"negative seek position {base + offset}")
            self._pos = base + offset
            return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return bool(self._f.closed)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fetching ------------------------------------------------------------------------------
    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) in one range request, counted."""
        try:
            self._f.seek(start)
            data = bytes(self._f.read(end - start))
        except Exception as exc:
            raise store_error(self.url, exc) from None
        _count(self.url, len(data))
        return data

    def _from_blocks(self, start: int, end: int) -> bytes:
        assert self._blocks is not None
        first, last = start // COALESCE_BLOCK, (end - 1) // COALESCE_BLOCK
        for b in range(first, last + 1):
            if b not in self._blocks:
                self._blocks[b] = self._fetch(b * COALESCE_BLOCK, min(self.size, (b + 1) * COALESCE_BLOCK))
        data = b"".join(self._blocks[b] for b in range(first, last + 1))
        offset = start - first * COALESCE_BLOCK
        return data[offset : offset + (end - start)]

    @contextmanager
    def coalesced(self) -> Iterator[RangeFile]:
        """Within the block, small reads come from 64 KiB blocks fetched once (for parsing a TIFF's structure);
        larger reads, and every read after the block, are exact range requests."""
        self._blocks = {}
        try:
            yield self
        finally:
            self._blocks = None


def hash_ends(h: Any, url: SlideURL) -> None:
    """Feed the size and the first and last MiB of the object into ``h``: two range reads, the same bytes
    (and so the same fingerprint) as ``slide._hash_ends`` on a local copy."""
    with RangeFile(url) as f:
        size = f.size
        h.update(str(size).encode())
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))


#: Formats whose readers (OpenSlide, pydicom, PIL) need a local file: refused from a URL with the fix.
LOCAL_ONLY_SUFFIXES = {".mrxs", ".vms", ".vmu", ".svslide", ".dcm", ".jpg", ".jpeg", ".png"}


def require_in_place_format(url: SlideURL) -> None:
    """UsageError (exit 2) for a format that cannot be read in place from an object store."""
    if url.suffix.lower() in LOCAL_ONLY_SUFFIXES:
        raise UsageError(
            f"{url}: {url.suffix} slides are read by readers that need a local file (OpenSlide, pydicom, PIL); "
            "download it first (e.g. `aws s3 cp URL .` or `gcloud storage cp URL .`) and give the local path. "
            "TIFF-based slides (SVS, TIFF, OME-TIFF, NDPI, SCN, BIF) are read in place"
        )


def not_readable_in_place(url: SlideURL, exc: BaseException) -> SlideFormatError:
    """The error for an object tiffslide cannot open (exit 4), naming the fix."""
    if read_stats(url).size == 0:
        return SlideFormatError(f"{url}: the object is empty (0 bytes); upload the slide again")
    return SlideFormatError(
        f"{url}: not a TIFF-based slide that can be read in place ({type(exc).__name__}: "
        f"{' '.join(str(exc).split())[:160]}); check the object, or download it first and give the local path "
        "(other formats are read from local files)"
    )
