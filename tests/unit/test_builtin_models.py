"""Built-in model builds leave the process environment as they found it."""

from __future__ import annotations

import os

import pytest

from serving.engine.builtin_models import _env_default

NAME = "OSS_SERVING_TEST_ENV_DEFAULT"


def test_set_for_the_step_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NAME, raising=False)
    with _env_default(NAME, "/cache/tiktoken"):
        assert os.environ[NAME] == "/cache/tiktoken"
    assert NAME not in os.environ


def test_removed_even_when_the_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NAME, raising=False)
    with pytest.raises(RuntimeError), _env_default(NAME, "x"):
        raise RuntimeError("build failed")
    assert NAME not in os.environ


def test_a_value_already_set_wins_and_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAME, "/home/ray/tiktoken")
    with _env_default(NAME, "/cache/tiktoken"):
        assert os.environ[NAME] == "/home/ray/tiktoken"
    assert os.environ[NAME] == "/home/ray/tiktoken"
