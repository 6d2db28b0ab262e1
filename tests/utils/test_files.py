"""utils/files.py: atomic writes under a full disk, SoIR-owned folders, the folder lock under real
concurrency, the file-facts cache."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from utils.errors import SoIRError
from utils.files import (
    FileFacts,
    FolderLock,
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    folder_kind,
    read_json,
    remove_own_files,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_full_disk_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """Before: run_config.json was written in place (empty after ENOSPC) and identity.json.tmp stayed."""
    target = tmp_path / "run_config.json"
    atomic_write_json(target, {"threshold": 0.2})
    real_open = open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(target, {"threshold": 0.5})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"threshold": 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.json"]


def test_corrupt_metadata_is_one_line_with_the_fix(tmp_path):
    (tmp_path / "identity.json").write_text("")
    with pytest.raises(SoIRError, match=r"identity.json is empty or corrupt .*; delete the folder"):
        read_json(tmp_path / "identity.json", fix="delete the folder")


def test_claim_folder_refuses_a_users_folder_and_accepts_its_own(tmp_path):
    user = tmp_path / "dataset"
    (user / "queries").mkdir(parents=True)
    (user / "queries" / "q.jpg").write_bytes(b"precious")
    with pytest.raises(SoIRError, match=r"dataset is not empty and was not made by SoIR"):
        claim_folder(user, "features")
    assert folder_kind(user) is None and (user / "queries" / "q.jpg").read_bytes() == b"precious"
    mine = claim_folder(tmp_path / "new" / "features", "features")
    assert folder_kind(mine) == "features"
    (mine / "gallery").mkdir()
    assert claim_folder(mine, "features") == mine  # not empty, but ours
    with pytest.raises(SoIRError, match="is a SoIR features folder, not a masks folder"):
        claim_folder(mine, "masks")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert folder_kind(claim_folder(empty, "masks")) == "masks"


def test_remove_own_files_deletes_only_matching_files_in_a_soir_folder(tmp_path):
    root = claim_folder(tmp_path / "out", "features")
    (root / "queries").mkdir()
    for name in ("shard-00000.safetensors", "images.json", "notes.txt"):
        (root / "queries" / name).write_text("x")
    removed = remove_own_files(root / "queries", ["shard-*.safetensors", "images.json"], root=root)
    assert sorted(p.name for p in removed) == ["images.json", "shard-00000.safetensors"]
    assert [p.name for p in (root / "queries").iterdir()] == ["notes.txt"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "images.json").write_text("theirs")
    with pytest.raises(SoIRError, match="was not made by SoIR"):
        remove_own_files(user, ["images.json"])
    assert (user / "images.json").read_text() == "theirs"


def test_lock_refuses_a_second_holder_and_frees_itself_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(ROOT)!r})
        from utils.files import FolderLock
        with FolderLock({str(tmp_path)!r}):
            print("locked", flush=True); time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SoIRError, match=f"being written by process {holder.pid} on"):
            with FolderLock(tmp_path):
                pass
    finally:
        holder.kill()  # kill -9: no cleanup code runs
        holder.wait()
    with FolderLock(tmp_path):  # the kernel released the dead holder's lock
        assert (tmp_path / ".lock").read_text().endswith(f" {os.getpid()}")


@pytest.mark.slow  # 30 processes race for the lock
def test_stale_lock_is_taken_by_exactly_one_of_many_concurrent_processes(tmp_path):
    """Before: 30 processes finding a stale lock at once could both "take it over" (2 to 6 holders)."""
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} 999999")  # left behind by a dead run
    script = textwrap.dedent(f"""
        import os, sys, time; sys.path.insert(0, {str(ROOT)!r})
        from utils.errors import SoIRError
        from utils.files import FolderLock
        open({str(tmp_path)!r} + "/ready." + str(os.getpid()), "w").close()
        while not os.path.exists({str(tmp_path / "go")!r}): time.sleep(0.001)     # start together
        try:
            with FolderLock({str(tmp_path)!r}):
                with open({str(tmp_path / "holders")!r}, "a") as f: f.write("in\\n")
                time.sleep(0.5)
                with open({str(tmp_path / "holders")!r}, "a") as f: f.write("out\\n")
        except SoIRError:
            pass
        """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(30)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready.*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    events = (tmp_path / "holders").read_text().split()
    depth = max_depth = 0
    for event in events:
        depth += 1 if event == "in" else -1
        max_depth = max(max_depth, depth)
    assert events and max_depth == 1


def test_file_facts_recompute_only_changed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SOIR_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    facts = FileFacts("test_len", lambda p: calls.append(p.name) or {"n": len(p.read_bytes())})
    a, b = tmp_path / "a", tmp_path / "b"
    atomic_write_text(a, "12345")
    atomic_write_text(b, "1")
    assert facts([a, b]) == [{"n": 5}, {"n": 1}]
    assert FileFacts("test_len", facts.compute)([a, b]) == [{"n": 5}, {"n": 1}] and len(calls) == 2
    atomic_write_text(b, "123")
    assert facts([a, b]) == [{"n": 5}, {"n": 3}] and calls[2:] == ["b"]
