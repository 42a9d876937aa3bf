"""Shards in object stores (``s3://``, ``gs://``, ``ais://``, ``msc://profile/...``), through
multi-storage-client (MSC).

Why MSC: one client for every store NVIDIA clusters use, with the credentials and endpoints
users already configure for it. A URL is resolved the way ``msc.resolve_storage_client`` does:
``msc://NAME/path`` uses profile NAME of the MSC config (``MSC_CONFIG``, else
``~/.msc_config.yaml``); ``s3://bucket/path`` uses that config's ``path_mapping`` when one
matches, else an implicit profile whose boto3 client follows boto3's default chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / instance roles,
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint, ``AWS_DEFAULT_REGION``).

This module only names, lists and fetches objects; ``shards`` parses the bytes with the same
reader as local files, so samples and damage reports do not depend on where a shard lives.
MSC is imported on first use, so local-only runs never need it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["expand_url", "is_url", "missing_objects", "object_stamp", "read_object"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def is_url(path: str) -> bool:
    """Whether ``path`` names an object-store URL (``scheme://...``) rather than a local file."""
    return isinstance(path, str) and _URL.match(path) is not None


def _msc() -> Any:
    try:
        import multistorageclient
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("object-store shard URLs need multi-storage-client: pip install multi-storage-client "
                          "(plus boto3 for s3://)") from e
    return multistorageclient


def _client(url: str) -> tuple[Any, str]:
    """MSC's storage client for ``url`` and the object path inside it."""
    return _msc().resolve_storage_client(url)


def _folder_and_rest(url: str) -> tuple[str, str]:
    """``s3://b/p/train-*.tar`` -> (``s3://b/p/``, ``train-*.tar``); the folder keeps its '/'."""
    scheme_end = url.index("://") + 3
    cut = url.rfind("/", scheme_end)
    if cut < 0:  # ``s3://bucket``: the bucket's top level
        return url + "/", ""
    return url[:cut + 1], url[cut + 1:]


def _list_names(folder: str, recursive: bool) -> dict[str, int]:
    """Objects under ``folder`` (a URL ending in '/'), as {path relative to it: size}.

    Names come from the client's listing (``include_url_prefix=False``), so they are cut
    relative to the folder's own object path and the returned URLs keep the user's scheme
    (``s3://``, not MSC's ``msc://_s3-bucket`` form)."""
    client, path = _client(folder)
    base = path.rstrip("/")
    prefix = base + "/" if base else ""
    out: dict[str, int] = {}
    for meta in client.list(path=path, include_directories=not recursive):
        if meta.type != "file" or not meta.key.startswith(prefix):
            continue
        rel = meta.key[len(prefix):]
        if rel and (recursive or "/" not in rel):
            out[rel] = meta.content_length
    return out


_FEW = 16  # up to this many URLs of one folder are checked one by one, more by listing the folder


def _is_object(url: str) -> bool:
    client, path = _client(url)
    return bool(path) and not path.endswith("/") and client.is_file(path)


def missing_objects(urls: Sequence[str]) -> list[str]:
    """The URLs of ``urls`` that name no object, in their order. A few per folder are checked
    one request each; more take one listing of the folder (a brace range of 10k shards would
    otherwise be 10k round trips at start-up)."""
    by_folder: dict[str, list[tuple[str, str]]] = {}
    for url in urls:
        folder, name = _folder_and_rest(url)
        by_folder.setdefault(folder, []).append((url, name))
    missing: set[str] = set()
    for folder, entries in by_folder.items():
        if len(entries) <= _FEW:
            missing.update(url for url, _ in entries if not _is_object(url))
        else:
            present = _list_names(folder, recursive=False)
            missing.update(url for url, name in entries if name not in present)
    return [url for url in urls if url in missing]


def _glob_match(rel: str, pattern: str) -> bool:
    """Shell-glob match where, as for local paths, ``*`` and ``?`` do not cross '/'."""
    names, parts = rel.split("/"), pattern.split("/")
    return len(names) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts))


def expand_url(part: str, spec: str) -> list[str]:
    """A glob, folder or single object URL -> sorted existing object URLs (brace ranges are
    expanded by ``shards.expand_shards`` and checked with ``missing_objects``).

    - glob ``s3://b/p/train-*.tar`` (globs in any path component after the bucket);
    - folder ``s3://b/p/`` or ``s3://b/p`` when no object has that exact name: its ``*.tar``
      objects directly under it (not in sub-folders), like a local directory;
    - anything else must be one existing object.
    Failures are FileNotFoundError naming the spec and the URL."""
    scheme_end = part.index("://") + 3
    first_glob = _GLOB_CHARS.search(part, scheme_end)
    if first_glob is not None:
        cut = part.rfind("/", scheme_end, first_glob.start())
        if cut < 0:
            raise ValueError(f"shard spec {spec!r}: {part!r} has a glob in the bucket name; globs may only "
                             f"follow the bucket (s3://bucket/prefix/train-*.tar)")
        folder, pattern = part[:cut + 1], part[cut + 1:]
        names = _list_names(folder, recursive="/" in pattern)
        urls = sorted(folder + rel for rel in names if _glob_match(rel, pattern))
        if not urls:
            raise FileNotFoundError(f"shard spec {spec!r}: glob {part!r} matched no objects")
        return urls
    if _is_object(part):
        return [part]
    folder = part if part.endswith("/") else part + "/"
    urls = sorted(folder + rel for rel in _list_names(folder, recursive=False) if rel.endswith(".tar"))
    if urls:
        return urls
    if part.endswith("/"):
        raise FileNotFoundError(f"shard spec {spec!r}: folder {part!r} contains no *.tar objects")
    raise FileNotFoundError(f"shard spec {spec!r}: shard object {part!r} does not exist "
                            f"(nor is it a folder of *.tar objects)")


def read_object(url: str) -> bytes:
    """The whole object's bytes. A missing or forbidden object is an OSError (FileNotFoundError,
    PermissionError), as for a local file; any other failure (the endpoint unreachable after
    MSC's retries) is a RuntimeError naming the URL: a network fault is not shard damage, so the
    loaders must not skip the shard for it."""
    client, path = _client(url)
    try:
        return client.read(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - MSC raises RuntimeError and provider errors
        raise RuntimeError(f"cannot read shard {url} through multi-storage-client: {type(e).__name__}: {e}") from e


def object_stamp(url: str) -> Optional[tuple[int, str]]:
    """(size, last modified) of the object, to key caches the way (size, mtime) keys local files;
    None when the store does not say."""
    client, path = _client(url)
    try:
        meta = client.info(path)
    except Exception:  # noqa: BLE001 - no stamp means no caching, never an error
        return None
    return int(meta.content_length), str(meta.last_modified)
