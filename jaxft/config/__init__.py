"""The typed run configuration: YAML + `key.sub=value` overrides → a validated `Config`.

YAML files carry only what differs from these defaults. Every error names the key: an unknown key
(with a did-you-mean), a value of the wrong type, or an impossible value. Validation happens before
anything heavy (model, data) is loaded.

One file per part of the YAML: `model.py` (model:), `data.py` (data:, tasks:, sampling:), `train.py`
(optim:, train:, mesh:, checkpoint:), `run.py` (the whole `Config` and its cross-section checks),
`load.py` (reading, overrides, writing).
"""

from jaxft.config.base import ConfigError, Section
from jaxft.config.data import AugmentSection, CleanSection, DataSection, SamplingSection, TaskSpec
from jaxft.config.load import apply_override, load_config, save_config
from jaxft.config.model import LoraSection, MoESection, ModelSection
from jaxft.config.run import Config
from jaxft.config.train import (LOSS_CHUNK_TOKENS, OBJECTIVES, CheckpointSection, DistillSection, EarlyStopping,
                                GRPOSection, MeshSection, OptimSection, PreferenceSection, RewardSpec, SamplesSection,
                                TrainSection)

__all__ = ["AugmentSection", "CheckpointSection", "CleanSection", "Config", "ConfigError", "DataSection",
           "DistillSection", "EarlyStopping", "GRPOSection", "LOSS_CHUNK_TOKENS", "LoraSection", "MeshSection", "MoESection",
           "ModelSection", "OBJECTIVES", "OptimSection", "PreferenceSection", "RewardSpec", "SamplesSection", "SamplingSection",
           "Section", "TaskSpec", "TrainSection", "apply_override", "load_config", "save_config"]
