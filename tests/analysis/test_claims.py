"""The claims table (analysis/claims.py): every figure 16-22 covered, rows validated when built."""

import pytest

from analysis import claims as C


def test_the_table_covers_figures_16_to_22():
    figures = {c.figure[:5] for c in C.CLAIMS}
    assert figures == {"fig16", "fig17", "fig18", "fig19", "fig20", "fig21", "fig22"}
    fig18 = [c for c in C.CLAIMS if c.figure == "fig18"]
    assert {c.relation for c in fig18} == {"equivalent", "a < b", "increasing in x", "differs"}
    assert all(c.margin == C.MARGIN for c in C.CLAIMS if c.relation == "equivalent")
    with pytest.raises(ValueError, match="needs a margin"):
        C.Claim("fig20", "tp_blocks", "x", "equivalent", C.TPB)
    with pytest.raises(ValueError, match="relation 'better'"):
        C.Claim("fig20", "tp_blocks", "x", "better")
