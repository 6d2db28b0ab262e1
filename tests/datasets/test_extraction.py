"""datasets/extraction.py: jobs, their checks against image headers, their digest, the Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import Annotation, ImageMasks, encode_mask, encode_mask_row_major
from datasets.extraction import ImageJob, check_jobs, jobs_digest, query_mask
from datasets.images import image_facts
from utils.errors import SoIRError


def test_query_mask_is_the_caption_mask_overlapping_the_bbox():
    masks = ImageMasks(
        [{"counts": "a", "size": [100, 100]}, {"counts": "b", "size": [100, 100]}],
        [[0, 0, 10, 10], [30, 30, 70, 70]],
        [0.9, 0.8],
    )
    query = Annotation(key="q.jpg", file=Path("q.jpg"), ins=(1,), is_query=True, bbox=(40, 40, 60, 60))
    assert query_mask(masks, query).bboxes == [[30, 30, 70, 70]]
    elsewhere = Annotation(key="q.jpg", file=Path("q.jpg"), ins=(1,), is_query=True, bbox=(80, 80, 90, 90))
    assert query_mask(masks, elsewhere) is None  # no overlap: the caller uses the bbox rectangle
    no_box = Annotation(key="q.jpg", file=Path("q.jpg"), ins=(1,), is_query=True)
    with pytest.raises(ValueError, match="2 masks and no bbox"):
        query_mask(masks, no_box)


def _image(path: Path, size=(40, 30), orientation: int = 1) -> Path:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.new("RGB", size, (200, 10, 10)).save(path, exif=exif)
    return path


def _masks(height: int, width: int, writer=encode_mask) -> ImageMasks:
    mask = np.zeros((height, width), dtype=bool)
    mask[2:8, 3:9] = True
    return ImageMasks([writer(mask)], [[3, 2, 9, 8]], [1.0])


def test_check_jobs_finds_every_box_mask_and_header_problem_before_any_model(tmp_path, monkeypatch):
    """Before: these surfaced only after the whole gallery was extracted."""
    monkeypatch.setenv("SOIR_CACHE_DIR", str(tmp_path / "cache"))
    good, other = _image(tmp_path / "good.jpg"), _image(tmp_path / "other.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    jobs = [
        ImageJob(Annotation("good.jpg", good, (1,), True, (0, 0, 60, 10)), crop="tight"),  # box too wide
        ImageJob(Annotation("other.jpg", other, (1,), False), masks=_masks(20, 20)),  # masks 20x20
        ImageJob(Annotation("broken.jpg", tmp_path / "broken.jpg", (2,), False)),
    ]
    facts = image_facts([j.annotation.file for j in jobs])
    with pytest.raises(SoIRError) as info:
        check_jobs(jobs, facts, "gallery", bad_images="error")
    message = str(info.value)
    assert message.startswith("3 gallery images cannot be used; set bad_images=skip")
    assert "bbox [0, 0, 60, 10] lies outside the 40x30 image" in message
    assert "other.jpg: its masks are 20x20 (H x W) but the image is 30x40" in message
    assert "broken.jpg: unreadable image (UnidentifiedImageError" in message
    kept, skipped = check_jobs(jobs[2:], facts[2:], "gallery", bad_images="skip")
    assert kept == [] and skipped[0][:2] == ("gallery", "broken.jpg")


def test_original_format_masks_made_before_exif_rotation_are_turned(tmp_path, monkeypatch):
    """The original mask script ignored EXIF: its masks have the stored (un-rotated) size."""
    monkeypatch.setenv("SOIR_CACHE_DIR", str(tmp_path / "cache"))
    photo = _image(tmp_path / "phone.jpg", size=(40, 30), orientation=6)  # shown as 30 x 40
    original = _masks(30, 40, writer=encode_mask_row_major)
    job = ImageJob(
        Annotation("phone.jpg", photo, (1,), False),
        masks=ImageMasks(original.masks_rle, original.bboxes, original.scores, made_before_exif=True),
    )
    (kept,), _ = check_jobs([job], image_facts([photo]), "gallery", bad_images="error")
    assert kept.masks.exif_orientation == 6 and kept.masks.masks().shape == (1, 40, 30)
    from PIL import ImageOps

    from datasets import load_rgb

    stored = np.zeros((30, 40), dtype=bool)
    stored[2:8, 3:9] = True
    expected = np.asarray(ImageOps.exif_transpose(Image.open(photo)).size)  # (W, H) upright = (30, 40)
    assert tuple(expected) == load_rgb(photo).size
    rotated = np.rot90(stored, k=-1)  # orientation 6: 90 deg clockwise
    np.testing.assert_array_equal(kept.masks.masks()[0], rotated)
    ours = ImageJob(Annotation("phone.jpg", photo, (1,), False), masks=_masks(30, 40))  # SoIR's own format
    with pytest.raises(SoIRError, match="masks are 30x40 .* image is 40x30"):
        check_jobs([ours], image_facts([photo]), "gallery", bad_images="error")


def test_jobs_digest_ignores_labels_and_unused_boxes_but_not_pixels_or_masks(tmp_path, monkeypatch):
    monkeypatch.setenv("SOIR_CACHE_DIR", str(tmp_path / "cache"))
    path = _image(tmp_path / "g.jpg")
    ann = Annotation("g.jpg", path, (1,), False)
    facts = {"g.jpg": image_facts([path])[0]}
    base = jobs_digest([ImageJob(ann, masks=_masks(30, 40))], facts)
    relabelled = Annotation("g.jpg", path, (5, 6), False, bbox=(1, 1, 5, 5), obj_name="mug")
    assert jobs_digest([ImageJob(relabelled, masks=_masks(30, 40))], facts) == base
    other_mask = ImageMasks([encode_mask(np.ones((30, 40), dtype=bool))], [[0, 0, 40, 30]], [1.0])
    assert jobs_digest([ImageJob(ann, masks=other_mask)], facts) != base
    _image(path, size=(40, 30)).write_bytes(path.read_bytes() + b"\0")  # other bytes
    assert jobs_digest([ImageJob(ann, masks=_masks(30, 40))], {"g.jpg": image_facts([path])[0]}) != base
    query = Annotation("q.jpg", path, (1,), True, bbox=(1, 1, 5, 5))
    cropped = jobs_digest([ImageJob(query, crop="tight")], {"q.jpg": facts["g.jpg"]})
    moved = Annotation("q.jpg", path, (1,), True, bbox=(2, 1, 5, 5))
    assert jobs_digest([ImageJob(moved, crop="tight")], {"q.jpg": facts["g.jpg"]}) != cropped


def test_query_masks_all_and_gallery_crop_jobs():
    from datasets.extraction import gallery_jobs, query_jobs

    masks = ImageMasks(
        [{"counts": "a", "size": [100, 100]}, {"counts": "b", "size": [100, 100]}],
        [[0, 0, 10, 10], [30, 30, 70, 70]],
        [0.9, 0.8],
    )
    query = Annotation("q.jpg", Path("q.jpg"), (1,), True, bbox=(40, 40, 60, 60))
    (best,) = query_jobs([query], {"q.jpg": masks}, None, use_masks="zeroed")
    (every,) = query_jobs([query], {"q.jpg": masks}, None, use_masks="zeroed", all_masks=True)
    assert len(best.masks) == 1 and len(every.masks) == 2 and every.zero_background
    (unmasked,) = query_jobs([query], {"q.jpg": masks}, None, use_masks="unmasked")
    assert not unmasked.zero_background
    boxed = Annotation("g.jpg", Path("g.jpg"), (1,), False, bbox=(1, 1, 5, 5))
    plain = Annotation("h.jpg", Path("h.jpg"), (2,), False)
    jobs = gallery_jobs([boxed, plain], None, uses_masks=False, missing_masks="error", source="-", crop="square")
    assert [j.crop for j in jobs] == ["square", None]
    with pytest.raises(SoIRError, match="gallery_crop=true with masks"):
        gallery_jobs([boxed], {"g.jpg": masks}, uses_masks=True, missing_masks="error", source="-", crop="square")
    (full,) = gallery_jobs([plain], {}, uses_masks=True, missing_masks="full_mask", source="-")
    assert full.full_mask and not full.global_fallback
