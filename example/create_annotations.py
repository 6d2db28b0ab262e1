"""Build ``anns.pt`` from a folder-per-instance layout.

    python example/create_annotations.py --root DIR --out DIR/anns.pt [--bboxes boxes.json]

``--out`` must not exist yet: an existing file (a hand-made ``anns.pt``, an image) is never replaced.

Layout::

    DIR/queries/<instance_name>/*.jpg        query images of each instance
    DIR/gallery/<instance_name>/*.jpg        gallery images showing that instance
    DIR/gallery/_distractors/*.jpg           optional: gallery images showing no instance

Instance ids are the positions of the instance names in sorted order (over queries and
gallery), so they are stable across runs and machines (``hash(name)`` is salted per process).
Keys are paths relative to ``DIR`` (load with ``load_anns(out, galleries_dir=DIR,
queries_dir=DIR)`` or keep ``anns.pt`` in ``DIR``). ``--bboxes`` is a JSON object mapping a
query's relative path to ``[x1, y1, x2, y2]`` in pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python example/create_annotations.py`
    sys.path.insert(0, str(ROOT))

from datasets.anns import AnnotationError, parse_bbox, save_anns  # noqa: E402
from datasets.images import IMAGE_EXTENSIONS  # noqa: E402
from utils.errors import SoIRError  # noqa: E402
from utils.files import new_file  # noqa: E402

DISTRACTORS = "_distractors"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _instance_folders(split_dir: Path) -> dict[str, Path]:
    """{instance name: folder}; image files lying directly in ``split_dir`` are an error."""
    loose = _images(split_dir)
    if loose:
        raise ValueError(
            f"'{split_dir}' holds images outside instance folders, e.g. '{loose[0].name}'; "
            "put each image in <split>/<instance_name>/"
        )
    return {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir()}


def build_annotations(root: str | Path, bboxes: dict[str, list[float]] | None = None) -> dict[str, dict]:
    """The ``anns.pt`` dict for the layout under ``root`` (see module doc)."""
    root = Path(root)
    queries_dir, gallery_dir = root / "queries", root / "gallery"
    for folder in (queries_dir, gallery_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"'{folder}' does not exist; expected {root}/queries/<instance>/ and {root}/gallery/<instance>/"
            )
    query_folders = _instance_folders(queries_dir)
    gallery_folders = _instance_folders(gallery_dir)
    if DISTRACTORS in query_folders:
        raise ValueError(f"'{queries_dir / DISTRACTORS}': distractors belong in the gallery only")
    distractor_dir = gallery_folders.pop(DISTRACTORS, None)
    names = sorted(set(query_folders) | set(gallery_folders))
    instance_id = {name: i for i, name in enumerate(names)}

    anns: dict[str, dict] = {}
    for is_query, folders in ((True, query_folders), (False, gallery_folders)):
        for name, folder in folders.items():
            files = _images(folder)
            if not files:
                raise ValueError(f"'{folder}' contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            for file in files:
                ins = instance_id[name]
                anns[file.relative_to(root).as_posix()] = {
                    "ins": ins if is_query else [ins],
                    "is_query": is_query,
                    "obj_name": name,
                }
    if distractor_dir is not None:
        for file in _images(distractor_dir):
            anns[file.relative_to(root).as_posix()] = {"ins": [], "is_query": False}

    for key, box in (bboxes or {}).items():
        if key not in anns or not anns[key]["is_query"]:
            raise ValueError(f"bbox given for '{key}', which is not a query image under '{root}'")
        anns[key]["bbox"] = list(parse_bbox(box, f"bbox of '{key}'"))
    return dict(sorted(anns.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="folder with queries/ and gallery/")
    parser.add_argument("--out", required=True, type=Path, help="anns.pt to write")
    parser.add_argument("--bboxes", type=Path, help="JSON {query relative path: [x1, y1, x2, y2]}")
    args = parser.parse_args(argv)
    try:  # an existing --out may be a hand-made anns.pt or one of the images: never replaced
        new_file(args.out, "anns.pt")
    except SoIRError as err:
        raise SystemExit(f"error: {err}") from None
    bboxes = None
    if args.bboxes is not None:
        try:
            bboxes = json.loads(args.bboxes.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"cannot read --bboxes '{args.bboxes}': {err}") from err
        if not isinstance(bboxes, dict):
            raise SystemExit(f"--bboxes '{args.bboxes}' must hold a JSON object, got {type(bboxes).__name__}")
    try:
        anns = build_annotations(args.root, bboxes)
    except (ValueError, FileNotFoundError, AnnotationError) as err:
        raise SystemExit(f"error: {err}") from err
    save_anns(anns, args.out)
    queries = [a for a in anns.values() if a["is_query"]]
    instances = {a["obj_name"] for a in anns.values() if "obj_name" in a}
    print(
        f"wrote {args.out}: {len(instances)} instances, {len(queries)} queries "
        f"({sum('bbox' in q for q in queries)} with bbox), {len(anns) - len(queries)} gallery images "
        f"(distractors: {sum(a['ins'] == [] for a in anns.values())})"
    )


if __name__ == "__main__":
    main()
