import pytest

from sti.data import Example, load_split, parse_tsv, split_rt, summary
from sti.errors import DataError


def test_parse_binarises_and_drops_zeros(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes("1\t2.5\tgood film\r\n2\t-0.1\tmeh\tstill text\r\n3\t0\tneutral\r\n\r\n4\t1\tcaf\xe9\r\n".encode("latin-1"))
    ex = parse_tsv(f)
    assert [(e.id, e.label) for e in ex] == [("1", 1), ("2", 0), ("4", 1)]
    assert ex[1].text == "meh\tstill text"
    assert ex[2].text == "café"


def test_malformed_lines_are_errors(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("1\tnot-a-number\ttext\n")
    with pytest.raises(DataError, match="x.txt:1"):
        parse_tsv(f)
    f.write_text("1 2 text\n")
    with pytest.raises(DataError, match="tabs"):
        parse_tsv(f)


def test_split_is_stratified_disjoint_and_deterministic():
    ex = [Example(str(i), f"t{i}", int(i % 3 == 0), 1.0) for i in range(1000)]
    a, b = split_rt(ex), split_rt(list(reversed(ex)))
    assert a == b
    ids = [set(e.id for e in a[s]) for s in ("train", "dev", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(len(s) for s in ids) == 1000
    for s, share in (("train", 0.8), ("dev", 0.1), ("test", 0.1)):
        assert abs(len(a[s]) - share * 1000) <= 2
        pos = sum(e.label for e in a[s]) / len(a[s])
        assert abs(pos - 334 / 1000) < 0.01


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split"):
        load_split("validation")


@pytest.mark.real
def test_real_data_sizes(real_data_dir):
    rows = {r["split"]: r for r in summary(real_data_dir)}
    assert rows["train"]["size"] + rows["dev"]["size"] + rows["test"]["size"] == 10605 - 37
    assert rows["test"]["size"] == 1057
    assert rows["tweets"]["size"] == 4200 - 4
    assert rows["amazon"]["size"] == 3708 - 98
    assert rows["nyt"]["size"] == 5190 - 244
