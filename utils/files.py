"""Files and folders SoIR writes: atomic writes, SoIR-owned folders, a per-folder lock, a hash cache.

Three promises rest on this module:

* **Nothing half-written.** Every file goes through :func:`atomic_write`: a temporary file with a
  unique name (host and pid in it, so writers on several machines never share one) in the target
  folder, then ``os.replace``. A crash or a full disk leaves the previous file (or none), and the
  temporary file is removed on any error.
* **Only our own folders.** :func:`claim_folder` makes a folder SoIR's by writing a marker
  (``.soir.json``) into it, and refuses a non-empty folder that has no marker: SoIR never writes
  into, or deletes from, a folder it did not create. :func:`remove_own_files` deletes only files of
  known names inside such a folder.
* **One writer per folder.** :class:`FolderLock` holds ``fcntl.flock`` on ``<folder>/.lock``. The
  kernel releases it when the process ends in any way (``kill -9`` included), so there is never a
  stale lock to take over, and two processes can never both hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import socket
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable

from utils.errors import SoIRError

MARKER = ".soir.json"
LOCK = ".lock"


# ------------------------------------------------------------------------------------------ writes
def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name holds host and pid (unique per writer); it is removed if anything fails,
    e.g. ``OSError(ENOSPC)`` on a full disk, and the error is re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), mode="w")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys and one item per line (diff-friendly, stable bytes)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch  # here, so that processes using only the lock or the writers stay light

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a JSON metadata file SoIR wrote; an empty or corrupt one is a SoIRError naming the
    file and ``fix`` (e.g. "rerun with --overwrite")."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SoIRError(f"{path} is empty or corrupt ({type(err).__name__}: {err}); {fix}") from None


# --------------------------------------------------------------------------------- owned folders
def claim_folder(folder: str | Path, kind: str, ignore: Iterable[str] = ()) -> Path:
    """Create ``folder`` for SoIR output of ``kind`` ("features", "masks", "run", ...), or accept it
    when it is empty or already SoIR's folder of that kind; write the marker.

    ``ignore``: names (fnmatch) that do not make a folder "not empty": what Hydra itself wrote into a
    run folder before SoIR's code starts (``.hydra``, ``<job>.log``).

    Raises:
        SoIRError: see :func:`check_claimable`.
    """
    folder = check_claimable(folder, kind, ignore)
    if folder_kind(folder) is None:
        atomic_write_json(folder / MARKER, {"soir": kind, "format": 1})
    return folder


def check_claimable(folder: str | Path, kind: str, ignore: Iterable[str] = ()) -> Path:
    """What :func:`claim_folder` checks, writing nothing (for programs that check every input before
    they create anything).

    Raises:
        SoIRError: the folder is a file, holds files but no marker (not made by SoIR: refused, so
            a user's data is never written into or deleted), or is SoIR's folder of another kind.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SoIRError(f"{folder} is a file, not a folder; choose a folder for SoIR's {kind} output")
    owner = folder_kind(folder)
    foreign = [p.name for p in folder.iterdir() if not _matches(p.name, ignore)] if folder.is_dir() else []
    if owner is None and foreign:
        raise SoIRError(
            f"{folder} is not empty and was not made by SoIR (no {MARKER}; it holds "
            f"{', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); SoIR only writes into "
            f"folders it created: choose a new or empty folder for the {kind} output"
        )
    if owner is not None and owner != kind:
        raise SoIRError(f"{folder} is a SoIR {owner} folder, not a {kind} folder; choose another folder")
    return folder


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def new_file(path: str | Path, what: str) -> Path:
    """``path`` for a single output file that does not exist yet: SoIR never replaces a file that it
    cannot prove it wrote (an existing ``anns.pt`` may be hand-made, ``--out`` may name an image).

    Raises:
        SoIRError: "<path> already exists; ..." naming the fix.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise SoIRError(
            f"{path} already exists; SoIR does not replace files it did not write: choose a new path for "
            f"the {what} (or move the old file away yourself)"
        )
    return path


def folder_kind(folder: str | Path) -> str | None:
    """The kind in ``folder``'s SoIR marker, or None when it has no (readable) marker."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("soir")
    except (ValueError, AttributeError):
        return None


def remove_own_files(folder: str | Path, patterns: Iterable[str], root: str | Path | None = None) -> list[Path]:
    """Delete the files directly in ``folder`` whose names match ``patterns`` (fnmatch), but only
    when ``root`` (default ``folder``) is a SoIR-owned folder containing ``folder``; anything else
    in it stays. Returns the deleted paths."""
    folder, root = Path(folder), Path(root or folder)
    if folder_kind(root) is None:
        raise SoIRError(f"refusing to delete in {folder}: {root} was not made by SoIR (no {MARKER})")
    if not folder.resolve().is_relative_to(root.resolve()):
        raise SoIRError(
            f"refusing to delete in {folder}: it leads out of {root} (a symbolic link to {folder.resolve()}), "
            "and SoIR deletes only inside the folders it made; replace the link by a folder"
        )
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and _matches(path.name, patterns):
            path.unlink()
            removed.append(path)
    return removed


def remove_stale_temporaries(folder: str | Path, root: str | Path | None = None) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` directly in ``folder`` (inside the SoIR-owned
    ``root``, default ``folder``) whose writer is dead: written on this host by a pid that no longer
    runs (a ``kill -9``, an out-of-memory kill). A live writer's file, and any other host's (its pid
    cannot be checked from here), stay. Returns the deleted paths."""
    folder, root = Path(folder), Path(root or folder)
    if not folder.is_dir() or folder_kind(root) is None or not folder.resolve().is_relative_to(root.resolve()):
        return []
    mine = re.compile(rf"^\..+\.{re.escape(socket.gethostname())}\.(\d+)\.tmp$")
    removed = []
    for path in sorted(folder.iterdir()):
        match = mine.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ------------------------------------------------------------------------------------- identities
def changed_keys(old: dict, new: dict) -> list[str]:
    """Top-level keys whose values differ between two identities (sorted)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_identity(path: str | Path, identity: dict, what: str, fix: str, save: bool = True) -> None:
    """Save ``identity`` (JSON-able) to ``path`` (unless ``save`` is False), or, when one is saved
    there, refuse a different one.

    This is what stops a folder from holding results of two settings or inputs: features folders,
    mask folders and training folders all call it before writing anything else.

    Raises:
        SoIRError: "<folder> holds <what> made with other settings or inputs (<key: old -> new>, ...);
            <fix>" (scalar values are shown, nested ones by key only).
    """
    path = Path(path)
    identity = json.loads(json.dumps(identity))  # as it reads back (tuples -> lists)
    if not path.exists():
        if save:
            atomic_write_json(path, identity)
        return
    saved = read_json(path, fix=f"delete {path.parent} or use another folder")
    changed = changed_keys(saved, identity)
    if changed:
        described = [
            f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" if _short(saved.get(k)) and _short(identity.get(k)) else k
            for k in changed
        ]
        raise SoIRError(
            f"{path.parent} holds {what} made with other settings or inputs ({'; '.join(described)}); {fix}"
        )


def _short(value: Any) -> bool:
    return not isinstance(value, (dict, list)) and len(repr(value)) <= 80


# ------------------------------------------------------------------------------------------ lock
class FolderLock:
    """Exclusive lock of one folder for one live process (``fcntl.flock`` on ``<folder>/.lock``).

    The lock file holds "<host> <pid>" of the holder for the error message. It is never deleted:
    deleting a lock file that another process is waiting on would let two processes lock two
    different files.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            host, _, pid = holder.partition(" ")
            who = f"process {pid} on {host}" if pid else holder
            raise SoIRError(
                f"{self.path.parent} is being written by {who}; wait for it to finish "
                f"(the lock is released when that process ends)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------------------------ hash cache
def cache_dir() -> Path:
    """``$SOIR_CACHE_DIR``, else ``$XDG_CACHE_HOME/soir``, else ``~/.cache/soir``."""
    if os.environ.get("SOIR_CACHE_DIR"):
        return Path(os.environ["SOIR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soir"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileFacts:
    """Facts computed from a file's bytes (its sha256, an image's size), cached by the file's
    resolved path, size, mtime, ctime and inode in an sqlite table under :func:`cache_dir`.

    A file that changes gets a new size, mtime or ctime and is read again, so the cache never returns
    a stale fact for a file edited in place: the ctime is set by the kernel on every write and cannot
    be set back by a user (``touch -d``, ``os.utime``, ``cp -p`` restore the mtime only). Where the
    cache cannot be written (read-only home on a cluster node) facts are computed every time; results
    are the same, only slower.
    """

    def __init__(self, name: str, compute: Callable[[Path], dict], version: int = 1):
        self.table, self.compute = f"{name}_v{version}", compute
        self.db: sqlite3.Connection | None = None
        with contextlib.suppress(OSError, sqlite3.Error):
            cache_dir().mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(cache_dir() / "file_facts.sqlite", timeout=60)
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (path TEXT PRIMARY KEY, stat TEXT, facts TEXT)")

    @staticmethod
    def _stat(path: Path) -> str:
        st = path.stat()
        return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"

    def __call__(self, paths: list[Path], threads: int = 8) -> list[dict]:
        """Facts of every path, in order (computed in ``threads`` threads where not cached)."""
        from concurrent.futures import ThreadPoolExecutor

        keys = [str(Path(p).resolve()) for p in paths]
        stats = [self._stat(Path(k)) for k in keys]
        cached: dict[str, tuple[str, str]] = {}
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                for i in range(0, len(keys), 500):
                    chunk = keys[i : i + 500]
                    rows = self.db.execute(
                        f"SELECT path, stat, facts FROM {self.table} WHERE path IN ({','.join('?' * len(chunk))})",
                        chunk,
                    )
                    cached.update({path: (stat, facts) for path, stat, facts in rows})
        todo = [i for i, (k, s) in enumerate(zip(keys, stats)) if cached.get(k, ("",))[0] != s]
        with ThreadPoolExecutor(threads) as pool:  # hashing and decoding release the GIL
            fresh = dict(zip(todo, pool.map(lambda i: self.compute(Path(keys[i])), todo)))
        if self.db is not None and todo:
            with contextlib.suppress(sqlite3.Error), self.db:
                self.db.executemany(
                    f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?)",
                    [(keys[i], stats[i], json.dumps(fresh[i])) for i in todo],
                )
        return [fresh[i] if i in fresh else json.loads(cached[k][1]) for i, k in enumerate(keys)]


def cached_sha256(paths: list[str | Path]) -> list[str]:
    """sha256 of each file, through the :class:`FileFacts` cache (read again only when changed)."""
    return [
        f["sha256"] for f in FileFacts("sha256", lambda path: {"sha256": sha256_file(path)})([Path(p) for p in paths])
    ]


# The files of a run folder (search_index.py, create_index.py's search): their presence means another run.
RUN_OUTPUTS = (
    "results.json",
    "rankings.jsonl",
    "per_query.csv",
    "features_config.yaml",
    "query.safetensors",
    "report.html",
    "thumbs",
    "maps",
)
# What Hydra writes into the run folder before SoIR's code starts: not a reason to refuse it.
HYDRA_FILES = (".hydra", "*.log", "multirun.yaml")


def check_run_folder(out: Path) -> None:
    """Claim the run folder (:func:`claim_folder`, kind "run") before anything is computed: a
    ``hydra.run.dir`` that names a user's folder is refused, and so is a SoIR run folder that holds
    another run's results; nothing there is ever overwritten. Called by search_index.py's work (both modes:
    utils/pipeline/search.py, utils/queries/own_queries.py) and create_index.py's search phase."""
    claim_folder(out, "run", ignore=HYDRA_FILES)
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if found:
        raise SoIRError(
            f"{out} already holds another run's results ({', '.join(found)}); SoIR does not overwrite "
            "them: leave hydra.run.dir at its default (a new folder per run) or name a new folder"
        )
