"""Shared test set-up: markers that skip cleanly where they cannot run; a private studio home."""

from __future__ import annotations

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("-m") or ""
    run_slow = os.environ.get("TWINSTUDIO_SLOW") == "1" or "slow" in markexpr
    run_hw = os.environ.get("TWINSTUDIO_HARDWARE") == "1"
    cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set TWINSTUDIO_SLOW=1 or use -m slow"))
        if "hardware" in item.keywords and not run_hw:
            item.add_marker(pytest.mark.skip(reason="needs studio hardware: set TWINSTUDIO_HARDWARE=1"))
        if "gpu" in item.keywords:
            if cuda is None:
                cuda = _cuda_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _studio_home(tmp_path_factory, monkeypatch):
    """Keys and the revocation list go to a fresh folder per test, never to the user's ~/.twinstudio."""
    monkeypatch.setenv("TWINSTUDIO_HOME", str(tmp_path_factory.mktemp("studio-home")))
