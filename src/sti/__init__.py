"""sti: Speedy Transformer Inference on memory-starved devices.

Data flows one way: model -> shards -> store -> profiles -> plan -> pipeline -> results.
The public API is re-exported here; the CLI (`sti`) is a thin layer over it.
"""

from .api import classify_exact, open_engine, plan
from .assets import ensure_data, ensure_model, sti_home
from .config import PRESETS, ModelConfig
from .data import Example, load_split
from .encoder import Submodel, classify, depth_layers, encode
from .errors import AssetError, Cancelled, ConfigError, DataError, InputError, StiError
from .evaluate import accuracy, predict_logits
from .finetune import FinetuneConfig, finetune
from .rewire import rewire, taylor_importance
from .tokenizer import Tokenizer
from .weights import LayerWeights, ModelWeights, ShardWeights, load_model_dir, save_model_dir

__version__ = "0.1.0"

__all__ = [
    "AssetError", "Cancelled", "ConfigError", "DataError", "Example", "FinetuneConfig", "InputError",
    "classify_exact", "open_engine", "plan",
    "LayerWeights", "ModelConfig", "ModelWeights", "PRESETS", "ShardWeights", "StiError", "Submodel",
    "Tokenizer", "accuracy", "classify", "depth_layers", "encode", "ensure_data", "ensure_model",
    "finetune", "load_model_dir", "load_split", "predict_logits", "rewire", "save_model_dir",
    "sti_home", "taylor_importance",
]
