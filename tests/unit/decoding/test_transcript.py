"""Views: a model continues from its own token ids; only another model's text is encoded for it."""

from __future__ import annotations

from decoding.transcript import Piece, View
from tests.fakes import EOS, CategoricalEngine, WordEngine


class CountingWords(WordEngine):
    """A word engine that counts what its tokenizer was asked to encode."""

    def __init__(self) -> None:
        super().__init__({}, name="words")
        self.encoded: list[str] = []
        encode = self.tokenizer.encode_continuation

        def counted(text: str) -> list[int]:
            self.encoded.append(text)
            return encode(text)

        self.tokenizer.encode_continuation = counted  # type: ignore[method-assign]


def test_own_tokens_stay_and_foreign_text_is_encoded_once_when_needed():
    words, chars = CountingWords(), CategoricalEngine({"x": 1.0})
    view = View(words, [7])
    own = view.own_piece([words.tokenizer.id("Sure"), words.tokenizer.id("thing")])
    assert own.text == " Sure thing" and own.covered == len(own.text)
    view.add(own)
    view.add(Piece(" is", chars.tokenizer.encode(" is"), chars.info.tokenizer_id, 3))
    view.add(Piece(" four", chars.tokenizer.encode(" four"), chars.info.tokenizer_id, 5))
    assert words.encoded == []
    ids = view.ids()
    assert words.encoded == [" is four"]  # the other model's text, once, as one continuation
    assert ids[:3] == [7, *own.token_ids] and words.tokenizer.decode(ids[1:]) == " Sure thing is four"
    assert view.answer_tokens() == 4


def test_a_model_sharing_the_tokenizer_passes_its_token_ids():
    shared: dict[str, int] = {}
    base, other = WordEngine({}, vocabulary=shared), WordEngine({}, vocabulary=shared)
    view = View(base, [])
    piece = View(other, []).own_piece([other.tokenizer.id("hello")])
    assert view.ids_with(piece) == piece.token_ids
    view.add(piece)
    assert view.ids() == piece.token_ids


def test_an_own_piece_ends_at_the_end_of_sequence_and_covers_a_prefix_of_the_kept_text():
    engine = WordEngine({})
    ids = [engine.tokenizer.id(w) for w in ("a", "bb", "c")] + [engine.tokenizer.id(EOS)]
    view = View(engine, [])
    assert view.own_piece(ids).token_ids == ids[:3]
    kept = view.own_piece(ids, text=" a bb")
    assert kept.token_ids == ids[:2] and kept.covered == len(" a bb")
    partial = view.own_piece(ids, text=" a b")  # the cut falls inside the token "bb"
    assert partial.token_ids == ids[:1] and partial.text[partial.covered :] == " b"
