"""The paper's numbers (HitNet, NeurIPS 2018), as ../shared/HITNET.md gives them: PTB test
perplexity per word, 1x300. Shared by the stages that print them beside ours."""

from __future__ import annotations

PAPER = {
    "lstm": {"fp": 97.2, "ternary": 110.3, "previous_ternary": 126.0},
    "gru": {"fp": 102.7, "ternary": 113.5, "previous_ternary": 142.0},
}
