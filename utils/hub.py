"""The HuggingFace hub: is a model available here, and which weights exactly did we load.

One rule for "offline" (:func:`hf_offline`) and one early check (:func:`check_model_available`)
for every model SoIR loads (backbones, OWLv2), so a machine without network gets one line that
names the model and the fixes, not a minute of retries and a traceback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

from utils.errors import SoIRError
from utils.files import cached_sha256
from utils.quiet import filter_token_id_warnings

# Every model SoIR loads (backbones, text towers, OWLv2, the tiny test models) imports this module.
filter_token_id_warnings()


def hf_offline() -> bool:
    """True when the hub must not be contacted: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to
    a true value (1, ON, YES, TRUE; huggingface_hub's own rule), read now rather than at import."""
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def is_cached(model_name: str) -> bool:
    """True when the hub model's config is in the local HuggingFace cache."""
    return isinstance(huggingface_hub.try_to_load_from_cache(model_name, "config.json"), str)


def check_model_available(model_name: str, what: str = "model", key: str = "model_name=") -> None:
    """Fail in one line, before any download is tried, when ``model_name`` is neither a local folder
    nor in the HuggingFace cache and the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set).

    transformers would otherwise retry for about a minute and end in a long traceback. ``key`` is
    the option that names the model (``model_name=``, ``--owlv2_model``), for the fix.
    """
    if Path(model_name).exists():
        return
    try:
        if is_cached(model_name):
            return
    except HFValidationError:
        raise SoIRError(
            f"{what} {model_name!r} is neither an existing folder nor a HuggingFace hub id; check {key.rstrip('= ')}"
        ) from None
    fixes = (
        f"pass {key.rstrip()}{'' if key.endswith('=') else ' '}/path/to/a/local/folder (saved with "
        "save_pretrained), or try the pipeline offline with `bash example/run_example.sh --tiny`"
    )
    if hf_offline():
        raise SoIRError(
            f"{what} {model_name!r} is needed but is not in the HuggingFace cache and HF_HUB_OFFLINE is set; {fixes}"
        )
    try:
        huggingface_hub.HfApi().model_info(model_name, timeout=10)
    except RepositoryNotFoundError:
        raise SoIRError(
            f"{what} {model_name!r} is neither a local folder nor a model on the HuggingFace hub; check the name"
        ) from None
    except Exception as err:  # no network, DNS, proxy, timeout: all mean "cannot download it now"
        raise SoIRError(
            f"{what} {model_name!r} is needed but is not in the HuggingFace cache and the hub "
            f"cannot be reached ({type(err).__name__}: {str(err)[:120]}); {fixes}"
        ) from None


def model_weights_identity(model_name: str) -> dict:
    """What pins the weights behind ``model_name``: for a local folder, the sha256 of its files
    (cached by size and mtime, so a changed checkpoint is noticed and an unchanged one is not
    re-read); for a hub id, the commit of the cached snapshot that was loaded."""
    folder = Path(model_name)
    if folder.is_dir():
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        digest = hashlib.sha256(
            "".join(
                f"{p.relative_to(folder).as_posix()} {sha}\n" for p, sha in zip(files, cached_sha256(files))
            ).encode()
        ).hexdigest()
        return {"model_path": str(folder.resolve()), "model_files_sha256": digest}
    config = huggingface_hub.try_to_load_from_cache(model_name, "config.json")
    revision = Path(config).parent.name if isinstance(config, str) else None
    return {"model_id": model_name, "model_revision": revision}
