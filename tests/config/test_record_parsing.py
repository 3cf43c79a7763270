"""Reading selection and record files: the fast path for long index lists reads exactly what protobuf reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format

from acps_core.config import selection
from acps_core.config.selection import read_selection
from acps_core.errors import ConfigError
from acps_core.proto import scale_offset_record_pb2 as record_pb2


def _node(name: str, ints: str, extra: str = "") -> str:
    return (f'producer {{ name: "{name}" attr {{ name: "type" type: STRING s: "Conv" }} '
            f'attr {{ name: "prune_index" type: INTS {ints}{extra} }} }}')


RECORDS = {
    "long lists over several lines": "prune_record {\n" + _node("a", "ints: [" + ",\n ".join(
        str(i) for i in range(0, 3000, 3)) + "]") + "\n" + _node("b", "ints: [ 1 , 2,3 ]") + "\n}\n",
    "strings and comments that look like lists": (
        "# ints: [1, 2]\nprune_record {\n" + _node('x ints: [7, 8] \\" ints: [9]', "ints: [4, 5]")
        + " # ints: [6]\n" + _node("y", "ints: []") + "\n}\n"),
    "single values, octal, hex and lists mixed": (
        "prune_record {\n" + _node("a", "ints: 5 ints: [010, 0x1f] ints: [3, 4] ints: 6") + "\n}\n"),
    "an attribute with an i of its own": "prune_record {\n" + _node("a", "ints: [1, 2]", " i: 3") + "\n}\n",
    "consumers": ("prune_record {\n" + _node("a", "ints: [1, 2]") + '\nconsumer { name: "c" attr { '
                  'name: "prune_index" type: INTS ints: [1, 2, 33] } }\n}\n'),
}


@pytest.mark.parametrize("text", RECORDS.values(), ids=list(RECORDS))
def test_a_record_reads_as_protobuf_reads_it(text: str) -> None:
    assert selection._parse_record(text) == text_format.Parse(text, record_pb2.ScaleOffsetRecord())


def test_long_lists_are_taken_out_of_the_text_protobuf_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    parse = text_format.Parse

    def spy(text: str, message: Any) -> Any:
        parsed.append(text)
        return parse(text, message)

    monkeypatch.setattr(selection.text_format, "Parse", spy)
    text = RECORDS["long lists over several lines"]
    record = selection._parse_record(text)
    assert len(parsed) == 1 and "2997" not in parsed[0]
    assert parsed[0].count("\n") == text.count("\n")  # the lines stay where they were
    assert list(record.prune_record[0].producer[0].attr[1].ints) == list(range(0, 3000, 3))


def test_an_error_after_a_long_list_names_its_own_line(tmp_path: Path) -> None:
    text = RECORDS["long lists over several lines"].replace('"b"', "b")  # an unquoted name, on the last lines
    path = tmp_path / "bad.selection"
    path.write_text(text)
    with pytest.raises(text_format.ParseError) as expected:
        text_format.Parse(text, record_pb2.ScaleOffsetRecord())
    with pytest.raises(ConfigError) as raised:
        read_selection(path)
    assert raised.value.line == expected.value.GetLine() and raised.value.line > 300


def test_indices_read_on_the_fast_path_are_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "repeated.selection"
    path.write_text("\n" * 5 + "prune_record {\n" + _node("a", "ints: [1, 2,\n 2]") + "\n}\n")
    with pytest.raises(ConfigError, match=r'layer "a" holds repeated channel indices \[2\]') as raised:
        read_selection(path)
    assert raised.value.line == 7
