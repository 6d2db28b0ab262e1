"""Gallery images from webdataset tar shards (datasets/tar_shards.py): the demo set written as 3 shards
gives features byte-identical to the run on its image folder; bad shard lists are refused."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import webdataset as wds

from datasets.tar_shards import is_tar_spec, unpacked_galleries
from tests.pipeline import features_dir_from, run_script
from utils.errors import SoIRError


def write_shards(folder: Path, members: list[tuple[str, bytes]], shards: int) -> str:
    """``members`` (name, bytes) spread over ``shards`` tar files written by webdataset's TarWriter (a
    sample per member: ``__key__`` = name without extension); returns the brace spec of the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:06d}.tar"), encoder=False) as sink:
            for name, data in members[s::shards]:
                stem, ext = name.rsplit(".", 1)
                sink.write({"__key__": stem, ext: data})
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def test_tar_shards_give_byte_identical_features(tiny_model_dirs, demo_dir, clip_demo_features, tmp_path):
    _, folder_run = clip_demo_features  # the same settings on the demo's gallery folder
    images = sorted((demo_dir / "gallery").glob("*.jpg"))
    spec = write_shards(tmp_path / "shards", [(f"gallery/{p.name}", p.read_bytes()) for p in images], 3)
    assert is_tar_spec(spec) and len(list((tmp_path / "shards").glob("*.tar"))) == 3
    proc = run_script(
        "create_index.py",
        "extractor=clip_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"galleries_dir='{spec}'",
        "num_workers=1",
        "shard_size=5",
        "only_create=true",
        cwd=tmp_path,
    )
    tar_run = features_dir_from(proc, tmp_path)
    # Identity by content: the same folder name (hash of the identity) and the same identity.
    assert tar_run.name == folder_run.name
    assert (tar_run / "identity.json").read_bytes() == (folder_run / "identity.json").read_bytes()
    for split in ("gallery", "queries"):
        shards = sorted(p.name for p in (folder_run / split).glob("shard-*.safetensors"))
        assert shards and shards == sorted(p.name for p in (tar_run / split).glob("shard-*.safetensors"))
        for name in shards:
            assert (tar_run / split / name).read_bytes() == (folder_run / split / name).read_bytes(), name


def test_unpack_resumes_and_refuses_bad_shard_lists(tmp_path):
    spec = write_shards(tmp_path / "a", [("g/x.jpg", b"1"), ("g/y.jpg", b"2"), ("g/z.jpg", b"3")], 3)
    images = unpacked_galleries(spec)
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg")) == ["g/x.jpg", "g/y.jpg", "g/z.jpg"]
    assert (images / "g" / "y.jpg").read_bytes() == b"2"
    (images / "g" / "y.jpg").unlink()  # done shards are not read again
    assert unpacked_galleries(spec) == images and not (images / "g" / "y.jpg").exists()

    with pytest.raises(SoIRError, match=r"1 of 4 tar shards do not exist"):
        unpacked_galleries(str(tmp_path / "a" / "{000000..000003}.tar"))
    twice = write_shards(tmp_path / "b", [("g/x.jpg", b"1"), ("g/x.jpg", b"2")], 2)
    with pytest.raises(SoIRError, match=r"g/x.jpg is in two tar shards \(000000.tar and 000001.tar\)"):
        unpacked_galleries(twice)
    outside = tmp_path / "c" / "000000.tar"
    outside.parent.mkdir()
    import tarfile

    with tarfile.open(outside, "w") as tar:
        info = tarfile.TarInfo("../evil.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(SoIRError, match="outside the images folder"):
        unpacked_galleries(str(outside))
    assert not (tmp_path / "evil.jpg").exists()
