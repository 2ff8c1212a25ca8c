"""Shared test set-up: offline Hugging Face, no stray configuration from the environment."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OSS_SERVING_CONFIG", raising=False)
