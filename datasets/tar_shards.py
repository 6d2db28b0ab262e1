"""Gallery images from webdataset tar shards: ``galleries_dir=/data/shards/{000000..000099}.tar``.

The anns keys of gallery images are the members' names in the tars (``gallery/g_000.jpg``: webdataset's
``__key__`` plus the extension). The shards are read with webdataset's tar reader and their image
members unpacked, each file atomically, into ``images/`` of a SoIR-owned folder (kind "tar-images") under the cache
(:func:`utils.files.cache_dir`, ``$SOIR_CACHE_DIR``), named by the shards' paths, sizes and mtimes; a
shard is marked done (``.<name>.done``) after its last member, so a killed unpack resumes shard by shard
and a rerun of create_index.py reads no tar again. That folder then serves as ``galleries_dir``: every
check, the images' identity (their bytes' sha256) and resume are those of a folder of images, and the
features are byte-identical to a run on the same images as files.

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
from utils.files import FolderLock, atomic_write, atomic_write_text, cache_dir, claim_folder

log = logging.getLogger("soir.datasets")

TAR_SPEC = re.compile(r"\.tar(\.gz)?$|\{\d+\.\.\d+\}")


def is_tar_spec(galleries_dir: str | None) -> bool:
    """True when ``galleries_dir`` names tar shards (a brace range ``{000000..000099}`` or a ``.tar``)."""
    return bool(galleries_dir) and bool(TAR_SPEC.search(str(galleries_dir)))


def unpacked_galleries(spec: str) -> Path:
    """The folder (``<unpacked>/images``) holding the image members of the tar shards ``spec``
    (brace-expanded as webdataset does), unpacked if not done yet (module doc). Raises SoIRError
    naming a missing shard, a member path outside the folder (absolute or with ``..``), or a member
    name found in two shards."""
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import tar_file_iterator

    shards = [Path(p) for p in expand_urls(spec)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SoIRError(
            f"galleries_dir={spec}: {len(missing)} of {len(shards)} tar shards do not exist, e.g. {missing[:3]}; "
            "fix the path or the brace range"
        )
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    digest = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]
    folder = claim_folder(cache_dir() / "tar_galleries" / digest, "tar-images")
    with FolderLock(folder):
        owner_file = folder / "members.json"
        owners: dict[str, str] = json.loads(owner_file.read_text()) if owner_file.is_file() else {}
        for shard in shards:
            done = folder / f".{shard.name}.done"
            if done.is_file():
                continue
            with open(shard, "rb") as stream:
                for member in tar_file_iterator(stream):
                    name = PurePosixPath(member["fname"])
                    if name.is_absolute() or ".." in name.parts:
                        raise SoIRError(f"{shard}: member {name} would be written outside the images folder; refused")
                    if owners.setdefault(str(name), shard.name) != shard.name:
                        raise SoIRError(
                            f"{name} is in two tar shards ({owners[str(name)]} and {shard.name}); anns keys "
                            "must name one image: remove one of them"
                        )
                    atomic_write(folder / "images" / name, lambda handle, data=member["data"]: handle.write(data))
            atomic_write_text(owner_file, json.dumps(owners, indent=0, sort_keys=True))
            atomic_write_text(done, "")
            log.info("unpacked %s into %s", shard, folder)
    return folder / "images"
