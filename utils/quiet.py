"""Quiet by default: third-party warnings that are not the user's concern are filtered where they arise.

Two are known, each matched by its own message (no blanket filter):

* transformers' ``Model config: bos_token_id must be `None` or an integer within the vocabulary`` (and
  eos / pad): SigLIP's and CLIP's text configs carry special-token ids outside their own vocabulary
  (transformers' defaults). SoIR's image embeddings never read them, and the text tower (T2I) takes
  its ids from the tokenizer, so the warning, repeated per config, only buries the tables.
* torch's ``torch.jit.script is deprecated`` FutureWarning, raised by torch itself the first time the
  LeGrad engine uses forward-mode AD (``torch.func.jvp`` loads torch's jit-scripted decompositions):
  nothing the user can change.

``verbose=true`` (:func:`set_verbose`) lets both through again; the CLIs' INFO lines then also reach
the terminal (``hydra.job_logging`` in configs/defaults.yaml; by default they go to the run's log file).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

_VERBOSE = False
TOKEN_ID_WARNING = re.compile(r"Model config: \w+_token_id must be `None` or an integer within the vocabulary")
JIT_SCRIPT_WARNING = r"`torch\.jit\.script` is deprecated"


def set_verbose(verbose: bool) -> None:
    """``verbose=true``: let the filtered third-party warnings through (for this process)."""
    global _VERBOSE
    _VERBOSE = bool(verbose)


class _TokenIdWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _VERBOSE or not TOKEN_ID_WARNING.search(record.getMessage())


def filter_token_id_warnings() -> None:
    """Drop transformers' special-token-id config warnings (see the module doc); idempotent."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _TokenIdWarnings) for f in logger.filters):
        logger.addFilter(_TokenIdWarnings())


@contextlib.contextmanager
def no_jit_script_deprecation() -> Iterator[None]:
    """Around a call into torch that may load its jit-scripted decompositions (``torch.func.jvp``)."""
    with warnings.catch_warnings():
        if not _VERBOSE:
            warnings.filterwarnings("ignore", message=JIT_SCRIPT_WARNING, category=FutureWarning)
        yield
