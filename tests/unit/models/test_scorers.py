from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models.scorers import HFRewardScorer, RuleScorer

PAIRS = [("Question: 2+2?\n", "4"), ("Question: capital of France?\n", "Paris is the capital."), ("Hi", "")]


async def test_hf_reward_scores_are_the_models_raw_logits(tiny_models: Path):
    scorer = HFRewardScorer("rm", tiny_models / "reward", batch_size=2)
    scores = await scorer.score(PAIRS)
    await scorer.close()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "reward")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models / "reward").eval()
    for (prompt, response), score in zip(PAIRS, scores, strict=True):
        with torch.no_grad():
            expected = model(**tokenizer(prompt + response, return_tensors="pt")).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)  # padding in a batch does not change a score


async def test_hf_reward_scorer_rejects_non_scalar_heads(tiny_models: Path):
    with pytest.raises(ValueError, match="num_labels=1"):
        HFRewardScorer("lm", tiny_models / "base")


async def test_rule_scorers():
    assert await RuleScorer("r", "regex", pattern=r"\bParis\b").score(PAIRS) == [0.0, 1.0, 0.0]
    assert await RuleScorer("j", "json").score([("", '{"a": 1}'), ("", "{a: 1}"), ("", "3")]) == [1.0, 0.0, 1.0]
    assert await RuleScorer("l", "length", target=4).score([("", "abcd"), ("", "ab"), ("", "abcdefgh")]) == [
        0.0,
        -0.5,
        -1.0,
    ]
    with pytest.raises(ValueError):
        RuleScorer("r", "regex")
