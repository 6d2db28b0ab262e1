"""Gallery images from webdataset tar shards: ``galleries_dir=/data/shards/{000000..000099}.tar``.

The anns keys of gallery images are the members' names in the tars (``gallery/g_000.jpg``: webdataset's
``__key__`` plus the extension). The shards are read with webdataset's tar reader and every member
(the images and any other file of the samples) unpacked, each file atomically, into ``images/`` of a
SoIR-owned folder (kind "tar-images") under the cache (:func:`utils.files.cache_dir`,
``$SOIR_CACHE_DIR``), named by the shards' names and contents (sha256, through the
:func:`utils.files.cached_sha256` cache: a tar rewritten in place, even with its mtime restored, is
another folder). ``members.json`` records each unpacked member's shard and sha256; a shard is marked
done (``.<name>.done``) after its last member, so a killed unpack resumes shard by shard. A rerun reads
no tar again unless an unpacked member is missing or not the bytes recorded: then its shard is unpacked
again (logged), never trusted. That folder then serves as ``galleries_dir``: every check, the images'
identity (their bytes' sha256) and resume are those of a folder of images, and the features are
byte-identical to a run on the same images as files.

Cost: the images are on disk twice (tars + unpacked). On a cluster, point ``SOIR_CACHE_DIR`` at storage
the workers share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path, PurePosixPath

from utils.errors import SoIRError
from utils.files import FolderLock, atomic_write, atomic_write_text, cache_dir, cached_sha256, claim_folder

log = logging.getLogger("soir.datasets")

TAR_SPEC = re.compile(r"\.tar(\.gz)?$|\{\d+\.\.\d+\}")


def is_tar_spec(galleries_dir: str | None) -> bool:
    """True when ``galleries_dir`` names tar shards (a brace range ``{000000..000099}`` or a ``.tar``)."""
    return bool(galleries_dir) and bool(TAR_SPEC.search(str(galleries_dir)))


def unpacked_galleries(spec: str) -> Path:
    """The folder (``<unpacked>/images``) holding the members of the tar shards ``spec``
    (brace-expanded as webdataset does), unpacked if not done yet or no longer as recorded (module
    doc). Raises SoIRError naming a missing shard, a member path outside the folder (absolute or with
    ``..``), or a member name found in two shards."""
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import tar_file_iterator

    shards = [Path(p) for p in expand_urls(spec)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SoIRError(
            f"galleries_dir={spec}: {len(missing)} of {len(shards)} tar shards do not exist, e.g. {missing[:3]}; "
            "fix the path or the brace range"
        )
    # By content, not by (path, size, mtime): those survive a rewrite in place with the mtime restored.
    contents = [(p.name, sha) for p, sha in zip(shards, cached_sha256(shards))]
    digest = hashlib.sha1(json.dumps({"format": 2, "shards": contents}).encode()).hexdigest()[:16]
    folder = claim_folder(cache_dir() / "tar_galleries" / digest, "tar-images")
    with FolderLock(folder):
        members_file = folder / "members.json"
        # member name -> {"shard": shard file name, "sha256": of its bytes}
        members: dict[str, dict[str, str]] = json.loads(members_file.read_text()) if members_file.is_file() else {}
        for shard_name in stale_shards(folder / "images", members):
            log.warning("%s: unpacked members of %s are missing or changed; unpacking it again", folder, shard_name)
            (folder / f".{shard_name}.done").unlink(missing_ok=True)
        for shard in shards:
            done = folder / f".{shard.name}.done"
            if done.is_file():
                continue
            with open(shard, "rb") as stream:
                for member in tar_file_iterator(stream):
                    name = PurePosixPath(member["fname"])
                    if name.is_absolute() or ".." in name.parts:
                        raise SoIRError(f"{shard}: member {name} would be written outside the images folder; refused")
                    owner = members.get(str(name), {"shard": shard.name})["shard"]
                    if owner != shard.name:
                        raise SoIRError(
                            f"{name} is in two tar shards ({owner} and {shard.name}); anns keys "
                            "must name one image: remove one of them"
                        )
                    data = member["data"]
                    atomic_write(folder / "images" / name, lambda handle, data=data: handle.write(data))
                    members[str(name)] = {"shard": shard.name, "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write_text(members_file, json.dumps(members, indent=0, sort_keys=True))
            atomic_write_text(done, "")
            log.info("unpacked %s into %s", shard, folder)
    return folder / "images"


def stale_shards(images: Path, members: dict[str, dict[str, str]]) -> list[str]:
    """Names of the shards with an unpacked member (under ``images``) that is missing or whose bytes
    are not the sha256 ``members`` recorded (sha256 through the :func:`cached_sha256` cache, so an
    unchanged file is not read again)."""
    present = [name for name in members if (images / name).is_file()]
    stale = {entry["shard"] for name, entry in members.items() if not (images / name).is_file()}
    for name, sha in zip(present, cached_sha256([images / name for name in present])):
        if sha != members[name]["sha256"]:
            stale.add(members[name]["shard"])
    return sorted(stale)
