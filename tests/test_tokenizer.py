import pytest

from sti.errors import InputError
from sti.tokenizer import Tokenizer

pytestmark = pytest.mark.real


def test_no_default_padding_and_batch_padding(real_model_dir):
    tok = Tokenizer(real_model_dir)
    b = tok.encode(["a fine film", "bad"])
    assert b.input_ids.shape == (2, 5)  # [CLS] a fine film [SEP]; not padded to 128
    assert b.lengths == [5, 3]
    assert b.input_ids[1, 3:].tolist() == [0, 0]
    assert tok.encode(["bad"], pad_to=128).input_ids.shape == (1, 128)


def test_truncation_is_reported(real_model_dir):
    tok = Tokenizer(real_model_dir, max_length=8)
    b = tok.encode(["word " * 50, "short"])
    assert b.input_ids.shape[1] == 8
    assert b.truncated == [True, False]


@pytest.mark.parametrize("texts", [[""], ["   \n"], [], [None]])
def test_bad_texts(real_model_dir, texts):
    with pytest.raises(InputError):
        Tokenizer(real_model_dir).encode(texts)
