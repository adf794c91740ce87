"""The base of every config section: unknown keys, NaN and infinity are errors naming the key."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


class Section(BaseModel):
    # allow_inf_nan=False: `train.epochs=.inf` or `optim.lr=.nan` is an error naming the key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
