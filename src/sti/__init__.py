"""sti: Speedy Transformer Inference on memory-starved devices.

Data flows one way: model -> shards -> store -> profiles -> plan -> pipeline -> results.

    import sti
    sti.build_store("path/to/hf-model", "store", calibration=sti.calibration_texts())  # shards, every bitwidth
    with sti.open_engine("store", latency_ms=30, memory_mb=2) as engine:   # profiles, plan, engine
        print(engine.run("a gripping, beautifully acted film").label)

The public API is re-exported here; the CLI (`sti`) is a thin layer over it.
"""

from .api import (calibrated_device, calibration_texts, classify_exact, device_profile, evaluate_file, exact_answers,
                  importance_profile, open_engine, plan, request_lengths, sample_requests)
from .assets import ensure_data, ensure_model, sti_home
from .config import PRESETS, ModelConfig
from .data import Example, load_split
from .datafile import Columns, read_examples, rows
from .demo import demo_store_path
from .encoder import Submodel, classify, depth_layers, encode
from .errors import AssetError, Cancelled, ConfigError, DataError, InputError, StiError, StoreError
from .evaluate import Served, accuracy, macro_f1, predict_logits, serve
from .finetune import FinetuneConfig, Task, finetune, user_task
from .inputs import Request, requests
from .profile_importance import measure_importance
from .planning import Plan, PlanError, PlanSet, explain, explain_set, make_plan, make_plan_set, simulate
from .profiles import DeviceProfile, ImportanceProfile, ProfileError, load_profile, save_profile
from .rewire import rewire, taylor_importance
from .runtime import Engine, Report, Result
from .store import Store, build_store
from .tokenizer import Tokenizer
from .weights import LayerWeights, ModelWeights, ShardWeights, load_model_dir, save_model_dir

__version__ = "0.1.0"

__all__ = [
    # the short path: store -> profiles -> plan -> engine
    "build_store", "calibration_texts", "Store", "device_profile", "calibrated_device", "importance_profile", "DeviceProfile", "ImportanceProfile",
    "load_profile", "save_profile", "plan", "make_plan", "make_plan_set", "Plan", "PlanSet", "request_lengths",
    "explain", "explain_set", "simulate", "open_engine", "Engine",
    "Result", "Report", "classify_exact", "exact_answers", "demo_store_path",
    # your own data: read it, measure on it, serve it, train on it
    "read_examples", "rows", "Columns", "requests", "Request", "measure_importance", "sample_requests",
    "evaluate_file", "serve", "Served", "macro_f1", "user_task", "Task",
    # models and training
    "ModelConfig", "PRESETS", "ModelWeights", "LayerWeights", "ShardWeights", "load_model_dir", "save_model_dir",
    "Submodel", "depth_layers", "encode", "classify", "Tokenizer", "finetune", "FinetuneConfig", "rewire",
    "taylor_importance", "accuracy", "predict_logits",
    # data and assets
    "Example", "load_split", "ensure_data", "ensure_model", "sti_home",
    # errors
    "StiError", "AssetError", "Cancelled", "ConfigError", "DataError", "InputError", "PlanError", "ProfileError",
    "StoreError",
]
