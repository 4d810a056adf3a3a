from collections.abc import Sequence

from models.text import IncrementalDetokenizer

# A byte-level toy vocabulary, like GPT-2's: ids 8 and 9 are the two bytes of "é".
PIECES = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: b"!", 5: b"\n", 8: b"\xc3", 9: b"\xa9"}


def decode(ids: Sequence[int]) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def run(ids: Sequence[int], stop: Sequence[str] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(decode, stop)
    deltas = []
    for token in ids:
        deltas.append(detokenizer.push(token))
        if detokenizer.stopped:
            break
    deltas.append(detokenizer.flush())
    return deltas, detokenizer


def test_deltas_concatenate_to_the_full_text():
    deltas, detokenizer = run([0, 1, 2, 3, 4])
    assert "".join(deltas) == "Hello world!" == detokenizer.text
    assert not detokenizer.stopped


def test_stop_string_cuts_the_output_before_it():
    deltas, detokenizer = run([0, 1, 2, 3, 4], stop=["wor"])
    assert detokenizer.stopped
    assert "".join(deltas) == "Hello " == detokenizer.text


def test_text_that_may_start_a_stop_string_is_held_back():
    detokenizer = IncrementalDetokenizer(decode, ["lo wo"])
    assert detokenizer.push(0) == ""  # the last 4 characters could begin the 5-character stop string
    assert detokenizer.push(1) == "H"
    assert detokenizer.push(2) == "el"  # "Hello wor" contains the stop string at "lo wo"
    assert detokenizer.stopped
    assert detokenizer.text == "Hel"
    assert detokenizer.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    _, detokenizer = run([0, 1, 2, 3, 4], stop=["!", "wor"])
    assert detokenizer.text == "Hello "


def test_partial_character_is_not_emitted_until_complete():
    detokenizer = IncrementalDetokenizer(decode)
    assert detokenizer.push(0) == "Hel"
    assert detokenizer.push(8) == ""
    assert detokenizer.push(9) == "é"
    assert detokenizer.text == "Helé"


def test_newline_is_ordinary_text():
    deltas, _ = run([0, 5, 1])
    assert "".join(deltas) == "Hel\nlo"
