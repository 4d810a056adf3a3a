"""Grammar-constrained decoding (GCD) and grammar-aligned sampling (ASAp; Park et al. 2024).

GCD masks the tokens that cannot continue a grammatical output and renormalises;
that distorts the distribution away from ``Q(w) ∝ P(w) · 1[w ∈ L(G)]``. ASAp keeps,
per (model, prompt, grammar, sampling settings, token budget), a trie of visited
prefixes with an upper bound on the expected future grammaticality ``EFG(u)``
(initially 1) and samples ``∝ P(t | u) · EFG(u t)`` over the allowed tokens, with
``P`` the raw, unmasked temperature-1 probabilities; every sample tightens the
bounds along its path, so repeated requests converge to ``Q``.

- ``params``: ``alignment.grammar``, its details, ``response_format``;
- ``trie``: the tries (log space) and their store;
- ``processors``: the per-token GCD and ASAp processors over one matcher state;
- ``compiler``: xgrammar compilation (EBNF, JSON schema, regex, Lark);
- ``constraint``: the processor stage of the pipeline: where the grammar runs, what each output says;
- ``vllm_plugin``: the same processors inside vLLM workers (imported by vLLM only).

Temperature: EFG is defined on temperature-1 probabilities and always computed from
them; the engine then applies the request's temperature and top-p to the reweighted
logits. Only temperature 1 and top-p 1 target ``Q`` exactly; other settings get
their own trie (they are part of its key).
"""

from decoding.grammar.compiler import GrammarCompiler, parse_grammar, worker_grammar
from decoding.grammar.constraint import GrammarConstraint, GrammarService, GrammarStage
from decoding.grammar.params import (
    VLLM_GRAMMAR_PLUGIN,
    WORKER_ARG,
    GrammarDetails,
    GrammarParams,
    response_format_grammar,
)
from decoding.grammar.processors import ASApLogitsProcessor, GCDLogitsProcessor, GrammarState, grammar_processors
from decoding.grammar.trie import EFGNode, EFGStore, EFGTrie, TrieSummary, trie_key

__all__ = [
    "VLLM_GRAMMAR_PLUGIN",
    "WORKER_ARG",
    "ASApLogitsProcessor",
    "EFGNode",
    "EFGStore",
    "EFGTrie",
    "GCDLogitsProcessor",
    "GrammarCompiler",
    "GrammarConstraint",
    "GrammarDetails",
    "GrammarParams",
    "GrammarService",
    "GrammarStage",
    "GrammarState",
    "TrieSummary",
    "grammar_processors",
    "parse_grammar",
    "response_format_grammar",
    "trie_key",
    "worker_grammar",
]
