"""Every method's effect on the toy world, through the HTTP API on the in-process engine.

Fixed seeds, held-out tasks only (entities, sums, requests and phrasings the chat models never saw),
95% bootstrap intervals over tasks; each test asserts its effect with a margin and prints what it
measured (``pytest -s`` shows the table the README's "Does it work?" section reports).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.divergence import best_of_n_bound, best_of_n_kl
from evaluation.gateway import LocalGateway
from evaluation.runner import Configuration, Outcome
from evaluation.statistics import bootstrap, paired_difference
from models.scorers import HFRewardScorer
from tests.toy_world import (
    CHAT_GREEDY,
    GREEDY,
    KNOWLEDGE,
    NUDGING,
    STOP,
    abstention,
    held_out_tasks,
    nudged_fraction,
    of,
    passed,
    report,
    run,
    seen_capitals,
)
from toyworld.world import true_reward

# The first test may build the world (`make test` builds it before pytest starts).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRANSFER_Q = {"baseline": "toy-baseline", "reward": "toy-rm", "top_k": 4, "rollout_tokens": 8}
GENARM = {"reward_model": "toy-arm", "top_k": 4, "beta": 2.0}


@pytest.fixture(scope="module")
def tasks(toy_world: Path) -> list[dict[str, Any]]:
    return held_out_tasks(toy_world)


def test_nudging_beats_the_base_and_the_nudger_with_few_tokens_nudged(
    toy_gateway: LocalGateway, tasks: list[dict[str, Any]]
):
    items = of(tasks, *KNOWLEDGE, "unsafe")
    base = run(toy_gateway, items, Configuration("base", "toy-base", "completions", sampling=GREEDY))
    nudger = run(toy_gateway, items, Configuration("nudger", "toy-nudger", sampling=GREEDY))
    nudged = run(toy_gateway, items, Configuration("nudged", "toy-base", alignment=NUDGING, sampling=GREEDY))
    over_base = paired_difference(passed(nudged), passed(base))
    over_nudger = paired_difference(passed(nudged), passed(nudger))
    details = [o.details["nudging"] for o in nudged]  # type: ignore[index]
    fraction = nudged_fraction(nudged)
    words = Counter(
        w for d in details for span in d["spans"] if span["source"] == "toy-nudger" for w in span["text"].split()
    )
    report("nudging", tasks=len(items), base=bootstrap(passed(base)), nudger=bootstrap(passed(nudger)),
           nudged=bootstrap(passed(nudged)), nudged_token_fraction=round(fraction, 3),
           most_nudged=words.most_common(6))  # fmt: skip
    assert over_base.low > 0.4 and over_nudger.low > 0.4
    assert fraction <= 0.2


def test_best_of_n_rises_with_n_within_its_kl_bound(toy_gateway: LocalGateway, tasks: list[dict[str, Any]]):
    items = of(tasks, *KNOWLEDGE)
    sampled = {"temperature": 1.0, **STOP}
    scores, rewards, kls = {}, {}, {}
    for n in (1, 2, 4, 8, 16):
        outcomes = run(toy_gateway, items, Configuration(f"bon{n}", "toy-base", "completions",
                                                     {"best_of_n": {"n": n, "reward": "toy-rm"}}, sampled))  # fmt: skip
        scores[n] = bootstrap(passed(outcomes))
        rewards[n] = bootstrap([true_reward(o.task, o.text) for o in outcomes])
        if n == 16:  # sixteen base samples per task, with their rewards: the plug-in distribution
            candidates = [o.details["best_of_n"]["candidates"] for o in outcomes]  # type: ignore[index]
            kls = {k: float(np.mean([best_of_n_kl(c, k) for c in candidates])) for k in (2, 4, 8, 16)}
    worst = run(
        toy_gateway,
        items,
        Configuration(
            "won8", "toy-base", "completions", {"best_of_n": {"n": 8, "reward": "toy-rm", "select": "min"}}, sampled
        ),
    )
    bounds = {n: round(best_of_n_bound(n), 3) for n in kls}
    report("best-of-N", tasks=len(items), score={n: str(e) for n, e in scores.items()},
           true_reward={n: str(e) for n, e in rewards.items()}, kl={n: round(v, 3) for n, v in kls.items()},
           kl_bound=bounds, worst_of_8=bootstrap(passed(worst)))  # fmt: skip
    assert scores[16].mean - scores[1].mean > 0.15 and rewards[16].mean - rewards[1].mean > 0.3
    assert all(scores[2 * n].mean >= scores[n].mean - 0.05 for n in (1, 2, 4, 8))
    assert all(kls[n] <= bounds[n] + 1e-9 for n in kls)
    assert bootstrap(passed(worst)).high < scores[1].low


def test_transfer_q_raises_the_reward_over_the_base(
    toy_gateway: LocalGateway, tasks: list[dict[str, Any]], toy_world: Path
):
    items = of(tasks, *KNOWLEDGE)[::3]
    base = run(
        toy_gateway, items, Configuration("base", "toy-base", "completions", sampling={"temperature": 1.0, **STOP})
    )
    direct = run(toy_gateway, items, Configuration("tq", "toy-base", alignment={"transfer_q": TRANSFER_Q},
                                               sampling={"max_tokens": 24}))  # fmt: skip
    indirect_q = {**TRANSFER_Q, "mode": "indirect", "baseline_reward": "concise", "beta": 1.0, "rollouts": 2}
    indirect = run(toy_gateway, items, Configuration("tq-indirect", "toy-base", alignment={"transfer_q": indirect_q},
                                                 sampling={"max_tokens": 24}))  # fmt: skip
    scorer = HFRewardScorer("toy-rm", toy_world / "reward")

    def rewards(outcomes: Sequence[Outcome]) -> list[float]:
        return asyncio.run(scorer.score([(o.task["prompt"], o.text) for o in outcomes]))

    measured = {name: rewards(outcomes) for name, outcomes in (("base", base), ("direct", direct),
                                                                 ("indirect", indirect))}  # fmt: skip
    report("Transfer-Q*", tasks=len(items), reward={name: str(bootstrap(v)) for name, v in measured.items()},
           score={name: str(bootstrap(passed(o))) for name, o in (("base", base), ("direct", direct),
                                                                   ("indirect", indirect))})  # fmt: skip
    assert paired_difference(measured["direct"], measured["base"]).low > 0
    assert paired_difference(measured["indirect"], measured["base"]).low > 0


def test_genarm_raises_the_reward_and_the_pass_rate_over_the_base_and_is_compared_with_args_and_transfer_q(
    toy_gateway: LocalGateway, tasks: list[dict[str, Any]], toy_world: Path
):
    # Matched per-step compute: the base's top 4 tokens, valued by the ARM (GenARM), by toy-rm on the partial
    # text (ARGS), by toy-rm after 8-token baseline rollouts (Transfer-Q*).
    items = of(tasks, *KNOWLEDGE)[::4]
    guided = {"max_tokens": 24, "stop": STOP["stop"], "seed": 0}
    configurations = {
        "base": Configuration("base", "toy-base", "completions", sampling={"temperature": 1.0, **STOP}),
        "genarm": Configuration("genarm", "toy-base", alignment={"genarm": GENARM}, sampling=guided),
        "args": Configuration("args", "toy-base", alignment={"transfer_q": {**TRANSFER_Q, "rollout_tokens": 0}},
                              sampling=guided),
        "transfer-q": Configuration("transfer-q", "toy-base", alignment={"transfer_q": TRANSFER_Q}, sampling=guided),
    }  # fmt: skip
    outcomes, seconds = {}, {}
    for name, configuration in configurations.items():
        started = time.perf_counter()
        outcomes[name] = run(toy_gateway, items, configuration)
        seconds[name] = round(time.perf_counter() - started, 1)
    scorer = HFRewardScorer("toy-rm", toy_world / "reward")
    rewards = {name: asyncio.run(scorer.score([(o.task["prompt"], o.text) for o in found]))
               for name, found in outcomes.items()}  # fmt: skip

    def divergence(name: str) -> float:
        method = "genarm" if name == "genarm" else "transfer_q"
        return round(float(np.mean([o.details[method]["log_ratio"] for o in outcomes[name]])), 2)  # type: ignore[index]

    report("GenARM vs ARGS vs Transfer-Q* (top_k 4)", tasks=len(items),
           reward={name: str(bootstrap(v)) for name, v in rewards.items()},
           score={name: str(bootstrap(passed(o))) for name, o in outcomes.items()},
           log_ratio={name: divergence(name) for name in ("genarm", "args", "transfer-q")}, wall_s=seconds)  # fmt: skip
    assert paired_difference(rewards["genarm"], rewards["base"]).low > 0.5
    assert paired_difference(passed(outcomes["genarm"]), passed(outcomes["base"])).low > 0.2


YES_NO = 'root ::= ("Yes" | "No") "."'


def test_asap_is_closer_than_gcd_to_the_grammar_conditioned_distribution(
    toy_gateway: LocalGateway, tasks: list[dict[str, Any]], toy_world: Path
):
    items = of(tasks, "yes-no")
    targets = [yes_no_target(toy_world / "baseline", task["messages"]) for task in items]
    measured: dict[str, dict[str, list[float]]] = {}
    for mode in ("asap", "gcd"):
        grammar = {"grammar": {"syntax": "ebnf", "grammar": YES_NO, "mode": mode}}
        answers = []
        for task in items:
            forget_tries(toy_gateway)
            rounds = [yes_no_answers(toy_gateway, task, grammar, seed) for seed in range(3)]
            answers.append(rounds[1] + rounds[2] if mode == "asap" else rounds[0] + rounds[1])  # ASAp: one to learn
        pairs = list(zip(answers, targets, strict=True))
        measured[mode] = {
            "tv": [total_variation(a, q) for a, q in pairs],
            "ll": [log_likelihood(a, q) for a, q in pairs],
        }
    report("ASAp vs GCD (yes-no under a grammar)", prompts=len(items),
           total_variation={m: str(bootstrap(v["tv"])) for m, v in measured.items()},
           mean_log_likelihood={m: str(bootstrap(v["ll"])) for m, v in measured.items()})  # fmt: skip
    assert paired_difference(measured["gcd"]["tv"], measured["asap"]["tv"]).low > 0
    assert paired_difference(measured["asap"]["ll"], measured["gcd"]["ll"]).low > 0


def total_variation(answers: list[str], target: dict[str, float]) -> float:
    return 0.5 * sum(abs(answers.count(sentence) / len(answers) - q) for sentence, q in target.items())


def log_likelihood(answers: list[str], target: dict[str, float]) -> float:
    """The mean log-probability of the answers under the model, relative to the language's mass."""
    return float(np.mean([math.log(target[answer]) for answer in answers]))


def forget_tries(toy_gateway: LocalGateway) -> None:
    import httpx

    assert httpx.delete(f"{toy_gateway.url}/admin/grammar/tries", timeout=30).status_code == 200


def yes_no_answers(toy_gateway: LocalGateway, task: dict[str, Any], grammar: dict[str, Any], seed: int) -> list[str]:
    with toy_gateway.client() as client:
        chat = client.chat.completions.create(model="toy-baseline", messages=task["messages"], n=8, seed=seed,
                                              max_tokens=8, extra_body={"alignment": grammar})  # fmt: skip
    return [choice.message.content or "" for choice in chat.choices]


def yes_no_target(path: Path, messages: list[dict[str, str]]) -> dict[str, float]:
    """The chat model's distribution over "Yes." and "No." (every tokenisation, then its end), renormalised."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)  # fmt: skip
    pieces = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)

    def mass(ids: list[int], rest: str) -> float:
        step = logprobs(ids)
        if not rest:
            return math.exp(float(step[tokenizer.eos_token_id]))
        return sum(math.exp(float(step[i])) * mass([*ids, i], rest[len(text):])
                   for i, text in pieces.items() if text and rest.startswith(text))  # fmt: skip

    masses = {sentence: mass(prompt, sentence) for sentence in ("Yes.", "No.")}
    total = sum(masses.values())
    return {sentence: value / total for sentence, value in masses.items()}


def test_guidelines_make_the_chat_model_follow_the_rules_and_leave_other_requests_alone(
    toy_gateway: LocalGateway, tasks: list[dict[str, Any]]
):
    rules = [task for task in tasks if task["category"].startswith("rule-")]
    benign = of(tasks, "capital")
    plain = Configuration("plain", "toy-nudger", sampling=CHAT_GREEDY)
    guided = Configuration("guided", "toy-nudger", alignment={"guidelines": {"top_k": 2}}, sampling=CHAT_GREEDY)
    without, with_ = run(toy_gateway, rules, plain), run(toy_gateway, rules, guided)
    benign_plain, benign_guided = run(toy_gateway, benign, plain), run(toy_gateway, benign, guided)
    unchanged = np.mean([a.text == b.text for a, b in zip(benign_plain, benign_guided, strict=True)])
    retrieved = np.mean([bool(o.details["guidelines"]["guidelines"]) for o in benign_guided])  # type: ignore[index]
    report("guidelines", rule_tasks=len(rules), compliance_without=bootstrap(passed(without)),
           compliance_with=bootstrap(passed(with_)), benign_unchanged=round(float(unchanged), 3),
           benign_with_a_guideline=round(float(retrieved), 3))  # fmt: skip
    assert paired_difference(passed(with_), passed(without)).low > 0.2
    assert unchanged >= 0.9


ABSTAIN_THRESHOLD = 0.12
"""G-NLL per token above which the chat model abstains (chosen on the seed-0 world; the test keeps margins)."""


def test_abstention_catches_the_facts_the_chat_model_never_saw(toy_gateway: LocalGateway, tasks: list[dict[str, Any]]):
    # The baseline chat model learned the training split's capitals only: the held-out ones it has to guess.
    seen, unseen = seen_capitals(), of(tasks, "capital")
    items, unknown = seen + unseen, [False] * len(seen) + [True] * len(unseen)
    alignment = {"abstain": {"threshold": ABSTAIN_THRESHOLD, "answer": "I do not know."}}
    plain = run(toy_gateway, items, Configuration("plain", "toy-baseline", sampling=CHAT_GREEDY))
    gated = run(toy_gateway, items, Configuration("abstain", "toy-baseline", alignment=alignment, sampling=CHAT_GREEDY))
    precision, recall, answered = abstention(gated, unknown)
    per_token = [o.details["abstain"]["uncertainty"]["nll_per_token"] for o in gated]  # type: ignore[index]
    report("abstain", seen=len(seen), unseen=len(unseen), precision=round(precision, 3), recall=round(recall, 3),
           answered_score_plain=bootstrap(passed(plain)), answered_score_abstain=bootstrap(answered),
           answered=len(answered), gnll_per_token_seen=round(float(np.mean(per_token[: len(seen)])), 3),
           gnll_per_token_unseen=round(float(np.mean(per_token[len(seen) :])), 3))  # fmt: skip
    assert all(o.text == "I do not know." for o in gated if o.details["abstain"]["abstained"])  # type: ignore[index]
    assert precision >= 0.75 and recall >= 0.6
    assert float(np.mean(answered)) > float(np.mean(passed(plain))) + 0.2


def test_early_rejection_is_best_of_16_at_rate_0_and_spends_under_a_third_of_its_tokens_above(
    toy_gateway: LocalGateway, tasks: list[dict[str, Any]]
):
    # Toy answers are about 14 tokens: under a third of best-of-16's tokens needs the first checkpoint at 3.
    items = of(tasks, *KNOWLEDGE)[::2]
    sampled = {"temperature": 1.0, **STOP}
    rejecting = {"n": 16, "reward": "toy-rm", "first_checkpoint": 3, "rejection_rate": 0.75, "rounds": 2}
    runs = {}
    for name, alignment in (("best-of-16", {"best_of_n": {"n": 16, "reward": "toy-rm"}}),
                            ("rate-0", {"early_rejection": {**rejecting, "rejection_rate": 0}}),
                            ("early-rejection", {"early_rejection": rejecting})):  # fmt: skip
        started = time.perf_counter()
        runs[name] = (run(toy_gateway, items, Configuration(name, "toy-base", "completions", alignment, sampled)),
                      time.perf_counter() - started)  # fmt: skip
    (best, best_s), (same, _), (early, early_s) = runs["best-of-16"], runs["rate-0"], runs["early-rejection"]
    best_reward = [max(c["reward"] for c in o.details["best_of_n"]["candidates"]) for o in best]  # type: ignore[index]
    early_reward = [o.details["early_rejection"]["reward"] for o in early]  # type: ignore[index]
    tokens = sum(o.completion_tokens for o in early) / sum(o.completion_tokens for o in best)
    report("early rejection", tasks=len(items), reward_best_of_16=bootstrap(best_reward),
           reward_early_rejection=bootstrap(early_reward),
           difference=paired_difference(early_reward, best_reward), token_ratio=round(tokens, 3),
           pass_best_of_16=bootstrap(passed(best)), pass_early_rejection=bootstrap(passed(early)),
           wall_s_best_of_16=round(best_s, 1), wall_s_early_rejection=round(early_s, 1))  # fmt: skip
    assert [o.text for o in same] == [o.text for o in best]
    assert tokens <= 1 / 3
