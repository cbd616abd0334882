import pytest
import torch

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from sti.config import PRESETS
from sti.weights import ModelWeights

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_config():
    return PRESETS["tiny"]


@pytest.fixture()
def tiny_weights(tiny_config):
    return ModelWeights.random(tiny_config, seed=1)


@pytest.fixture(scope="session")
def real_model_dir():
    from sti.assets import ensure_model
    return ensure_model(log=lambda *a: None)


@pytest.fixture(scope="session")
def real_data_dir():
    from sti.assets import ensure_data
    return ensure_data(log=lambda *a: None)


@pytest.fixture(scope="session")
def real_weights(real_model_dir):
    from sti.weights import load_model_dir
    return load_model_dir(real_model_dir, fresh_head=True)


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    from sti.tokenizer import Tokenizer
    return Tokenizer(real_model_dir)


def random_ids(config, batch=3, seq=9, seed=0):
    """Random token ids with a ragged attention mask (row b keeps seq - b tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        mask[b, seq - b:] = 0
        ids[b, seq - b:] = 0
    return ids, mask


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(116)]


def word_tokenizer(directory):
    tok = HFTokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory
