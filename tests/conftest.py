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
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def generous_profiles(store_dir, compute_dtype: str = "float32"):
    """Profiles (saved beside the store, storage "warm") under which any plan fits: the
    engine's answer then depends on the weights (and the compute dtype) only."""
    from sti import api
    from sti.profiles import DeviceProfile, ImportanceProfile, save_profile
    from sti.store import Store
    with Store(store_dir) as s:
        c, bits = s.config, s.bits
        sizes = {b: float(s.shard_record(0, 0, b).length) for b in bits}
        store_id = s.store_id
    device = DeviceProfile(store_id=store_id, storage="warm", threads=1, seq_len=16, shard_bytes=sizes,
                           shard_read_ms={b: 0.001 for b in bits}, shard_decode_ms={b: 0.001 for b in bits},
                           layer_read_ms=0.001, compute_coef=(0.01, 0.0, 0.0, 0.0), compute_fit_error=0.0,
                           embed_ms=(0.01, 0.0), head_ms=0.01, compute_dtype=compute_dtype)
    grid = {f"{n},{m}": 0.5 + 0.4 * n * m / (c.num_layers * c.num_shards)
            for n in range(1, c.num_layers + 1) for m in range(1, c.num_shards + 1)}
    importance = ImportanceProfile(store_id=store_id, method="degrade", split="dev", seed=0, lowest_bits=min(bits),
                                   full_accuracy=grid[f"{c.num_layers},{c.num_shards}"], submodel_accuracy=grid,
                                   shard_kl=tuple(tuple(0.01 for _ in range(c.num_shards)) for _ in range(c.num_layers)),
                                   shard_acc_drop=None, bits_error={b: 0.0 if b == 32 else 1.0 for b in bits},
                                   kl_to_acc=0.5)
    save_profile(device, api.device_profile_path(store_dir, "warm"))
    save_profile(importance, api.importance_profile_path(store_dir, "degrade"))


