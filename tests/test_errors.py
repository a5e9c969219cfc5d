"""The one rule for one-line error messages (``icd.errors.one_line``)."""

from __future__ import annotations

from icd.errors import one_line


def test_first_non_blank_line_with_whitespace_collapsed() -> None:
    assert one_line(ValueError("\n  bad   thing\there \nsecond line")) == "bad thing here"


def test_object_addresses_are_dropped_so_messages_are_stable() -> None:
    e = OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1e5d20>")
    assert one_line(e) == "cannot identify image file"


def test_empty_message_gives_the_type_name_and_long_ones_are_cut() -> None:
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError(" \n ")) == "RuntimeError"
    cut = one_line(ValueError("x" * 500), limit=50)
    assert len(cut) == 50 and cut.endswith("...")
