"""The engines' tokenizer: continuation text encodes as it would inside a longer text."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import InvalidRequestError
from models.tokenizer import Tokenizer

CORPUS = ["The answer is four and the answers are here", "an answer is an answer", "is it the answer"] * 20


@pytest.fixture(scope="module")
def byte_level(tiny_models: Path) -> Tokenizer:
    return Tokenizer(tiny_models / "base", name="tiny-base")


@pytest.fixture(scope="module")
def sentencepiece_like(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A Llama-style tokenizer: Metaspace with a word-initial space put before every text of its own."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], initial_alphabet=["\n"])
    raw.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("sentencepiece")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return Tokenizer(path, name="sp")


def test_byte_level_continuations_are_plain_encodings(byte_level: Tokenizer):
    for text in ["wer is", " is four", "\n\nnext", "é!"]:
        assert byte_level.encode_continuation(text) == byte_level.encode(text, add_special_tokens=False)


def test_a_word_split_across_calls_keeps_no_word_initial_space(sentencepiece_like: Tokenizer):
    tokenizer = sentencepiece_like
    start = tokenizer.encode("The ans", add_special_tokens=False)
    assert tokenizer.decode(start + tokenizer.encode("wer is", add_special_tokens=False)) == "The ans wer is"
    assert tokenizer.decode(start + tokenizer.encode_continuation("wer is")) == "The answer is"
    assert tokenizer.decode(start + tokenizer.encode_continuation(" is it")) == "The ans is it"


def test_prompts_as_ids_are_checked_against_the_vocabulary(byte_level: Tokenizer):
    assert byte_level.prompt_ids([1, 2]) == [1, 2]
    assert byte_level.prompt_ids("def f():") == byte_level.encode("def f():")
    for bad in ([], [-1], [byte_level.vocab_size]):
        with pytest.raises(InvalidRequestError) as info:
            byte_level.prompt_ids(bad)
        assert info.value.param == "prompt"
