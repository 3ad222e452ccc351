import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder, so relative run/checkpoint paths of the configs land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
