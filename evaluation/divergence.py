"""How far a configuration's answers are from the base model's, honestly per method and labelled as such.

- the plain base: 0;
- best-of-N (max or min selection, nothing else): the analytic bound ``log N - (N - 1) / N`` (Beirami et al.
  2024) and a plug-in estimate from each request's N candidates;
- Transfer-Q*, which defines per-step probabilities: the mean log-ratio ``log pi(y) - log pi_base(y)`` the
  server reports per answer, an estimate of KL(pi || pi_base);
- anything else (nudging, guidelines, grammars, another model): a proxy, the mean excess of
  ``-log pi_base(answer)`` over the base's own answers to the same tasks (nats per answer).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evaluation.runner import Outcome

BASE, BEST_OF_N, LOG_RATIO, PROXY = "base", "best-of-n", "log-ratio", "base-nll-proxy"
LABELS = {
    BASE: "the base itself",
    BEST_OF_N: "KL(best-of-N || base): plug-in estimate over each request's N candidates",
    LOG_RATIO: "mean log pi(y)/pi_base(y) of the answers: an estimate of KL(pi || base)",
    PROXY: "proxy: mean excess -log p_base(answer) over the base's own answers (nats)",
}


@dataclass(frozen=True, slots=True)
class Divergence:
    kind: str
    value: float | None
    bound: float | None = None

    @property
    def label(self) -> str:
        return LABELS[self.kind]


def best_of_n_bound(n: int) -> float:
    return math.log(n) - (n - 1) / n


def best_of_n_kl(candidates: Sequence[Mapping[str, Any]], n: int) -> float:
    """KL(best-of-n || p) for p the empirical distribution of the candidates' texts, exactly: a text of reward r
    is selected with probability (F(r)^n - F(r-)^n), shared by the texts of that reward as p shares it."""
    p = Counter(c["text"] for c in candidates)
    reward = {c["text"]: c["reward"] for c in candidates}
    total, kl, below = len(candidates), 0.0, 0.0
    for level in sorted(set(reward.values())):
        texts = [t for t in p if reward[t] == level]
        mass = sum(p[t] for t in texts) / total
        selected = (below + mass) ** n - below**n
        kl += sum(selected * (p[t] / total / mass) * math.log(selected / mass) for t in texts)
        below += mass
    return kl


def divergence(outcomes: Sequence[Outcome], base: Sequence[Outcome] | None, *, is_base: bool) -> Divergence:
    """The divergence of one configuration's answers (``base``: the base configuration's, for the proxy)."""
    answered = [o for o in outcomes if o.error is None]
    if is_base:
        return Divergence(BASE, 0.0)
    methods = {name for o in answered for name in (o.details or {})}
    if methods == {"best_of_n"}:
        records = [o.details["best_of_n"] for o in answered if o.details]
        if all(r["select"] in ("max", "min") for r in records):
            n = int(records[0]["n"])
            value = _mean([best_of_n_kl(r["candidates"], int(r["n"])) for r in records])
            return Divergence(BEST_OF_N, value, best_of_n_bound(n))
    if len(methods) == 1 and (method := next(iter(methods))) in ("transfer_q", "genarm"):  # token-guided decoding
        return Divergence(LOG_RATIO, _mean([o.details[method]["log_ratio"] for o in answered if o.details]))
    return Divergence(PROXY, excess_nll(answered, base or []))


def excess_nll(outcomes: Sequence[Outcome], base: Sequence[Outcome]) -> float | None:
    """Mean of ``-log p_base(answer) + log p_base(base's answer)`` over the tasks both answered."""
    own = {o.task["id"]: o.loglikelihood for o in base if o.error is None and o.loglikelihood is not None}
    gaps = [
        own[o.task["id"]] - o.loglikelihood for o in outcomes if o.loglikelihood is not None and o.task["id"] in own
    ]
    return _mean(gaps)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
