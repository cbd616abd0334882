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


@pytest.mark.parametrize("text, pair", [("a fine film", None), ("word " * 50, None), ("a fine film", "not bad")])
def test_one_text_is_encoded_as_its_row_of_a_batch(real_model_dir, text, pair):
    """The engine encodes one request at a time (a quicker path): the same ids, mask, token
    types and truncation as that text's row of a padded batch."""
    tok = Tokenizer(real_model_dir, max_length=16)
    one = tok.encode([text], pairs=None if pair is None else [pair])
    batch = tok.encode([text, "word " * 50], pairs=None if pair is None else [pair, None])
    n = one.input_ids.shape[1]
    assert one.input_ids.tolist() == batch.input_ids[:1, :n].tolist()
    assert one.attention_mask.tolist() == batch.attention_mask[:1, :n].tolist() == [[1] * n]
    assert one.token_type_ids.tolist() == batch.token_type_ids[:1, :n].tolist()
    assert one.truncated == batch.truncated[:1]
    assert one.input_ids.dtype == one.attention_mask.dtype == one.token_type_ids.dtype == batch.input_ids.dtype
