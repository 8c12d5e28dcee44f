"""File plumbing shared by the index, the engine and the jobs: durable writes, resumable work
folders, streaming digests cached on disk, and checkpoint loading that never unpickles code unless
asked to.

The files a run, a build or an audit produces go through :func:`atomic_write` (or, for a file
streamed to its temporary name, :func:`fsync_replace`): written to a temporary name in the same
folder, flushed and fsynced, renamed onto its name, the folder fsynced. Readers see the old file or
the new one, never half of one, and after a power cut one of the two is there. (Not so: appended
logs such as ``run.log`` and ``benchmarks/results.jsonl``, and the files engine/default's
data-building and training commands write.)

``file_digest(path)`` is the sha256 of a file's bytes, read in 16 MiB chunks (a 4.8 GB checkpoint
never sits in memory), and remembered by resolved path, size and modification time: in this process,
and in a small JSON cache (``$AMG_CACHE_DIR``, default ``$XDG_CACHE_HOME/amg-engine`` or
``~/.cache/amg-engine``) that other processes — every Ray actor, every rerun — read instead of
hashing the file again. A changed file (other size or mtime) is hashed again; a cache that cannot be
read or written only costs the hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 24  # 16 MiB
_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where the digest cache lives (``$AMG_CACHE_DIR``, else the XDG cache folder)."""
    if os.environ.get("AMG_CACHE_DIR"):
        return Path(os.environ["AMG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amg-engine"


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable."""
    with contextlib.suppress(OSError):  # not every file system can open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a complete file's data to the disk (before it is renamed or linked into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the complete file ``tmp`` onto ``path`` so that a power cut leaves one or the other:
    the data is flushed before the rename, the rename before returning."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(
    path: str | Path, write: Callable[[str], object], tmp: str | Path | None = None, durable: bool = True
) -> None:
    """``write(tmp)`` writes the whole file under a temporary name in ``path``'s folder (default
    ``.<name>.tmp-<pid>``), which then replaces ``path`` (:func:`fsync_replace`; ``durable=False``:
    a plain rename, for a file whose loss a reader detects and redoes). The temporary file never
    outlives a failed write."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        if durable:
            fsync_replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_plan_dir(work: Path, plan: dict, restart: bool, what: str) -> Path:
    """A resumable work folder holding ``plan.json``: reused when it holds the same plan, refused
    (ValueError naming what differs) when it holds another, emptied first when ``restart``.
    ``what`` names the work in the message, e.g. "an unfinished build"."""
    import shutil

    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(
                f"{work} holds {what} with another {', '.join(changed)}; rerun with the same inputs to "
                "resume it, or pass --restart (restart=True) to discard it"
            )
    else:
        atomic_write(plan_file, lambda p: Path(p).write_text(json.dumps(plan, indent=1)))
    return work


def sha256_stream(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, streamed (the project's one file digest; cached: file_digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path, prefix: int = 16) -> str:
    """The file's sha256 (first ``prefix`` hex characters), from the cache when the file is unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _memo:
            return _memo[key][:prefix]
    cached = _read_cache().get(key[0])
    if cached and cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
        digest = cached["sha256"]
    else:
        log.info("hashing %s (%.1f MB)", path, st.st_size / 1e6)
        digest = sha256_stream(path)
        _write_cache(key[0], {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    with _lock:
        _memo[key] = digest
    return digest[:prefix]


def _cache_file() -> Path:
    return cache_dir() / "digests.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, entry: dict) -> None:
    """Add one entry; concurrent writers may drop each other's entries, which only costs a re-hash."""
    target = _cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache()
        entries[path] = entry
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        text = json.dumps(entries)
        atomic_write(target, lambda p: Path(p).write_text(text), tmp=tmp, durable=False)  # a cache
    except OSError as e:  # a read-only home, a full disk: the digest is still right, just not cached
        log.debug("could not write the digest cache %s: %s", target, e)


def file_identity(path: str | Path) -> list[int] | None:
    """What tells a file's content from an earlier one at the same path without reading it: its size and
    modification and status-change times in ns (``cp -p``, ``rsync -t`` or ``touch -r`` can put the
    modification time back; only the kernel sets the status-change time); None where there is no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def unreadable_file(path: str | Path) -> str | None:
    """None when ``path`` opens for reading, else one message for every reason (missing, a folder, no
    permission), so that the message does not tell whether something is there."""
    try:
        with open(path, "rb"):
            return None
    except OSError:
        return f"cannot read {path}: no readable file there"


class UntrustedCheckpoint(ValueError):
    """A checkpoint that cannot be loaded with ``weights_only=True`` (it needs arbitrary unpickling)."""


def load_checkpoint(path: str | Path, trust_checkpoint: bool = False):
    """``torch.load`` with ``weights_only=True``; a file that needs more is refused unless trusted.

    Full unpickling can run any code the file carries, so it is only ever an explicit opt-in:
    ``trust_checkpoint=True`` (``--trust-checkpoint`` on the command line) for a file you trust.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            raise UntrustedCheckpoint(
                f"{path} holds more than tensors (weights_only=True refused it: {str(e).splitlines()[0]}); "
                "unpickling it could run code it carries. If you trust the file, pass --trust-checkpoint "
                "(trust_checkpoint=True), or re-save its state_dict alone with torch.save"
            ) from None
    log.warning("%s: loading with full unpickling (weights_only=False), as --trust-checkpoint allows", path)
    return torch.load(path, map_location="cpu", weights_only=False)
