"""The content MD5 of data files, computed once per file version and remembered.

    md5(path)        # datasets.download.content_md5(path), from the cache when the file has not changed

A file's version is its absolute path, size and modification time (ns). Verdicts are kept in memory and in
<user cache dir>/tf-by-hand/md5.json ($XDG_CACHE_HOME, else ~/.cache), so a data directory is hashed once,
not at every start (MNIST's four .gz files take 0.5-0.6 s on 2 busy CPU cores). The data directory itself is
never written (it may be read-only); a cache file that cannot be read or written is ignored.
"""
import json
import os
import tempfile

from datasets.download import content_md5

__all__ = ["md5", "cache_file"]

_memory = {}  # (path, size, mtime_ns) -> md5


def cache_file():
    """<$XDG_CACHE_HOME or ~/.cache>/tf-by-hand/md5.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tf-by-hand", "md5.json")


def _version(path):
    status = os.stat(path)
    return os.path.abspath(path), status.st_size, status.st_mtime_ns


def md5(path):
    """The MD5 of the content of `path` (decompressed for .gz); OSError, EOFError or zlib.error as
    content_md5 raises them for an unreadable or corrupt file."""
    version = _version(path)
    if version in _memory:
        return _memory[version]
    stored = _read_cache()
    entry = stored.get(version[0])
    if isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == version[1:]:
        _memory[version] = entry[2]
        return entry[2]
    digest = content_md5(path)
    _memory[version] = digest
    stored[version[0]] = [version[1], version[2], digest]
    _write_cache(stored)
    return digest


def _read_cache():
    try:
        with open(cache_file(), encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _write_cache(stored):
    """Writes `stored`, less the entries of files that are gone, atomically; silent if it cannot."""
    path = cache_file()
    kept = {name: entry for name, entry in stored.items() if os.path.exists(name)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".md5.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                json.dump(kept, f)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    except OSError:
        pass
