"""serving.cluster.weights: what the chart's download, wait and check steps do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serving.cluster import weights


def test_only_the_files_vllm_loads_are_wanted() -> None:
    assert weights.wanted("model-00001-of-00014.safetensors")
    assert weights.wanted("config.json")
    assert weights.wanted("chat_template.jinja")
    assert not weights.wanted("original/model--00001-of-00007.safetensors")
    assert not weights.wanted("original/config.json")
    assert not weights.wanted("metal/model.bin")
    assert not weights.wanted("README.md")


def test_download_skips_complete_folders_and_marks_new_ones(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    done = tmp_path / "openai--gpt-oss-20b"
    done.mkdir()
    (done / weights.MARKER).write_text("openai/gpt-oss-20b\n", encoding="utf-8")
    targets = weights.parse_targets(
        [f"openai/gpt-oss-20b={done}", f"openai/gpt-oss-120b={tmp_path / 'openai--gpt-oss-120b'}"]
    )
    fetched = weights.download(
        targets, snapshot=lambda **kw: calls.append(kw), repo_bytes=lambda repo: 10, free_bytes=lambda p: 100
    )
    assert fetched == [tmp_path / "openai--gpt-oss-120b"]
    (call,) = calls
    assert call["repo_id"] == "openai/gpt-oss-120b"
    assert call["ignore_patterns"] == ["original/*", "metal/*"]
    assert (tmp_path / "openai--gpt-oss-120b" / weights.MARKER).is_file()


def test_download_refuses_a_volume_that_is_too_small(tmp_path: Path) -> None:
    targets = weights.parse_targets([f"openai/gpt-oss-120b={tmp_path / 'm'}"])
    with pytest.raises(weights.WeightsError, match=r"needs 60\.0 GiB .* has 50\.0 GiB free: raise weights"):
        weights.download(
            targets,
            snapshot=lambda **kw: pytest.fail("must not download"),
            repo_bytes=lambda repo: 60 * 2**30,
            free_bytes=lambda p: 50 * 2**30,
        )


def test_download_without_size_metadata_still_downloads(tmp_path: Path) -> None:
    calls: list[Any] = []
    weights.download(
        weights.parse_targets([f"a/b={tmp_path / 'm'}"]),
        snapshot=lambda **kw: calls.append(kw),
        repo_bytes=lambda repo: None,
    )
    assert calls


def test_wait_returns_once_the_job_marked_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        (folder / weights.MARKER).touch()

    weights.wait([folder], sleep=sleep)
    assert sleeps == [15.0]


def test_check_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}", encoding="utf-8")
    assert weights.main(["check", str(empty), str(no_weights)]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: no config.json" in err
    assert f"{no_weights}: no *.safetensors" in err
    assert "tokenizer.json" in err  # says what to stage


def test_bad_arguments() -> None:
    assert weights.main([]) == 2
    assert weights.main(["download", "no-equals-sign"]) == 1
