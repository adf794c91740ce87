"""Every recipe in configs/ is a valid config (a typo in a shipped recipe fails here, not on a pod)."""

from __future__ import annotations

import pytest

from conftest import ROOT
from jaxft.config import load_config

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.model.name_or_path
    assert cfg.train.batch_size % cfg.train.grad_accum == 0
