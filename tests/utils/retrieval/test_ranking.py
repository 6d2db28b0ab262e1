"""utils/retrieval/ranking.py as a library: what it needs from its caller is refused in one line when missing
(the numbers themselves are checked in tests/test_search_index.py and tests/utils/retrieval/test_streaming.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from utils.errors import SoIRError
from utils.retrieval.ranking import rank_in_ram, rank_streamed


@pytest.mark.parametrize("rank", [rank_in_ram, rank_streamed])
def test_t2i_without_text_queries_is_one_line(rank, tmp_path):
    """The ranking knows no model: T2I's text vectors come from the caller (utils/pipeline/search.py). A
    library caller that forgets them gets one line, not a NoneType error from inside the ranking."""
    with pytest.raises(SoIRError, match="T2I=true needs text_queries"):
        rank(OmegaConf.create({"T2I": True}), tmp_path, None, None)
