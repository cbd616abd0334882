"""The data reader for users' files: each format, column finding, labels, and every error
case naming the file, the line and the problem."""

import json

import pytest

from sti.datafile import Columns, label_id, label_names, read_examples, rows, source_of, text_stream
from sti.errors import DataError

LABELS = ("negative", "positive")


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def test_tsv_is_split_on_tabs_and_never_unquoted(tmp_path):
    p = write(tmp_path, "d.tsv", 'sentence\tlabel\n"quoted" start, with commas\t1\nplain\tnegative\n')
    ex = read_examples(p, LABELS)
    assert [(e.text, e.label, e.text_pair) for e in ex] == [('"quoted" start, with commas', 1, None),
                                                            ("plain", 0, None)]
    assert ex[0].id == f"{p}:2"


def test_csv_quoted_fields_hold_commas_quotes_and_line_breaks(tmp_path):
    p = write(tmp_path, "d.csv", 'label,text,text_pair\npositive,"a, b ""c""","line one\nline two"\n0,x,\n')
    ex = read_examples(p, LABELS)
    assert ex[0].text == 'a, b "c"' and ex[0].text_pair == "line one\nline two" and ex[0].label == 1
    assert ex[1].text_pair is None  # an empty second text is no pair
    assert ex[1].id.endswith(":4")  # the line the record ends on


def test_jsonl_with_pairs_ids_and_names(tmp_path):
    lines = [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c", "label": "NEGATIVE"},
             {"sentence1": "d", "sentence2": None, "label": "0"}]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ex = read_examples(p, LABELS)
    assert [(e.text, e.text_pair, e.label) for e in ex] == [("a", "b", 1), ("c", None, 0), ("d", None, 0)]


def test_columns_given_by_name_win(tmp_path):
    p = write(tmp_path, "d.tsv", "text\tbody\ty\nignored\tused\tpositive\n")
    ex = read_examples(p, LABELS, Columns(text="body", label="y"))
    assert ex[0].text == "used" and ex[0].label == 1


def test_byte_order_mark_and_crlf(tmp_path):
    p = write(tmp_path, "d.csv", "\ufefftext,label\r\nhello,1\r\n")
    assert read_examples(p, LABELS)[0].text == "hello"


def test_plain_lines_and_jsonl_on_standard_input():
    plain = list(rows("-", stream=text_stream("one\n\n two \n")))
    assert [r.text for r in plain] == ["one", " two "] and all(r.label is None for r in plain)
    js = list(rows("-", stream=text_stream('{"text": "a", "text_pair": "b"}\n{"text": "c"}\n')))
    assert [(r.text, r.pair) for r in js] == [("a", "b"), ("c", None)]
    after_blank = list(rows("-", stream=text_stream('\n\n{"text": "a"}\n')))
    assert [r.text for r in after_blank] == ["a"]  # the first line that is not blank decides
    with pytest.raises(DataError, match="not standard input"):
        source_of("-", 1)


def test_limit_stops_reading_and_rows_are_lazy(tmp_path):
    p = write(tmp_path, "d.tsv", "text\tlabel\na\t1\nb\t0\n" + "bad line without a tab\n")
    assert len(read_examples(p, LABELS, limit=2)) == 2  # the bad third row is never read
    it = rows(p)
    assert next(it).text == "a"
    with pytest.raises(DataError, match=r"d.tsv:4: 1 fields, but the header names 2"):
        list(it)


@pytest.mark.parametrize("name,text,message", [
    ("d.tsv", "sentence\tlabel\n\tpositive\n", r"d.tsv:2: the text \('sentence'\) is empty"),
    ("d.tsv", "words\tlabel\na\t1\n", r"d.tsv:1: no text column: expected one named text, sentence, sentence1.*"
                                      r"'words', 'label'.*--text-column"),
    ("d.tsv", "text\tlabel\na\tneutral\n", r"d.tsv:2: unknown label 'neutral': the model's labels are negative, "
                                           r"positive \(or their ids 0..1\)"),
    ("d.tsv", "text\tlabel\na\t7\n", r"d.tsv:2: label id 7 is outside 0..1"),
    ("d.tsv", "text\nno label here\n", r"d.tsv:2: no label"),
    ("d.tsv", "text\tlabel\na\t\n", r"d.tsv:2: no label"),
    ("d.csv", 'text,label\n"unclosed,1\n', r"d.csv:2: .*"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 1}\n', r"d.jsonl:2: not valid JSON"),
    ("d.jsonl", '["a", 1]\n', r"d.jsonl:1: expected a JSON object"),
    ("d.jsonl", '{"text": 3, "label": 1}\n', r"d.jsonl:1: 'text' must be a string"),
    ("d.jsonl", '{"text": "a", "label": true}\n', r"d.jsonl:1: label True must be a name or an integer id"),
    ("d.tsv", "", r"d.tsv: the file is empty"),
    ("d.tsv", "text\tlabel\n", r"d.tsv: no examples"),
    ("d.xlsx", "text\n", r"unknown data format '.xlsx'"),
])
def test_errors_name_the_file_line_and_problem(tmp_path, name, text, message):
    p = write(tmp_path, name, text)
    with pytest.raises(DataError, match=message):
        read_examples(p, LABELS)


def test_a_given_column_that_is_missing_is_named(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,1\n")
    with pytest.raises(DataError, match=r"d.csv:1: no column 'premise' \(the second text\); the header names "
                                        r"'text', 'label'"):
        read_examples(p, LABELS, Columns(pair="premise"))


def test_bad_encoding_names_the_line(tmp_path):
    p = write(tmp_path, "d.tsv", "text\tlabel\n".encode() + "caf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"d.tsv:2: not UTF-8 text .*save the file as UTF-8"):
        read_examples(p, LABELS)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "none.tsv", LABELS)


def test_label_ids_names_and_case():
    labels = ("anger", "joy", "calm")
    assert [label_id(x, labels, "f:1") for x in ("joy", "JOY", 2, "0", " calm ")] == [1, 1, 2, 0, 2]
    with pytest.raises(DataError, match="outside 0..2"):
        label_id(-1, labels, "f:1")


def test_label_names_of_training_data():
    assert label_names(["pos", "neg", "pos"]) == ("neg", "pos")
    assert label_names(["1", "0", "2", 1]) == ("0", "1", "2")
    with pytest.raises(DataError, match="must be 0..1"):
        label_names(["1", "2"])
    with pytest.raises(DataError, match="at least two"):
        label_names(["only"])


def test_source_records_path_hash_and_size(tmp_path):
    import hashlib
    p = write(tmp_path, "d.tsv", "text\tlabel\na\t1\n")
    s = source_of(p, 1, Columns(text="text")).to_dict()
    assert s["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() and s["size"] == p.stat().st_size
    assert s["examples"] == 1 and s["columns"] == {"text": "text", "pair": None, "label": None}
