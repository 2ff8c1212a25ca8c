"""Fill, wait for, or check the weight cache of the Helm chart's GPU workers.

The chart runs this module in the cluster image (``python -m serving.cluster.weights``):

* ``download REPO=DIR ...``: the files vLLM loads of each Hugging Face repository, into
  ``DIR`` (the init container of every worker pod, or the chart's download Job for a
  shared claim). gpt-oss repositories also carry ``original/`` and ``metal/`` copies of
  the weights (about twice the size of the weights vLLM loads); those are never
  fetched. A folder already marked complete is skipped. Before downloading, the free
  space of the volume is compared with what the repository's files need.
* ``wait DIR ...``: block until the download Job has marked every folder complete.
* ``check DIR ...``: for weights you staged yourself: fail at once, saying what is
  missing, unless every folder holds a model (``config.json`` and ``*.safetensors``).

Exceptions::

    RuntimeError
     └── WeightsError   (not enough room, or a staged folder without a model)
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOW_PATTERNS",
    "IGNORE_PATTERNS",
    "MARKER",
    "WeightsError",
    "check",
    "download",
    "main",
    "wanted",
]

#: Written into a folder once its download completed (the chart's wait step looks for it).
MARKER = ".oss-serving-complete"
#: The files vLLM reads from a Hugging Face model folder: configuration, tokenizer,
#: chat template, safetensors weights and their index.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
#: Copies of the weights vLLM never loads (gpt-oss: the original checkpoint, Metal).
IGNORE_PATTERNS = ("original/*", "metal/*")
#: Headroom over the files' own size (partial files, metadata).
HEADROOM = 1.05


class WeightsError(RuntimeError):
    """The weights cannot be placed or are not where the chart expects them."""


def wanted(path: str) -> bool:
    """True when ``path`` (relative to the repository root) is a file vLLM loads."""
    if any(fnmatch.fnmatch(path, pattern) for pattern in IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatch(path, pattern) for pattern in ALLOW_PATTERNS)


@dataclass(frozen=True)
class Target:
    """One repository and the folder it goes into."""

    repo: str
    folder: Path


def parse_targets(args: Sequence[str]) -> list[Target]:
    targets = []
    for arg in args:
        repo, sep, folder = arg.partition("=")
        if not sep or not repo or not folder:
            raise WeightsError(f"expected REPO=DIR, got {arg!r}")
        targets.append(Target(repo, Path(folder)))
    return targets


def _repo_bytes(repo: str) -> int | None:
    """Bytes of the files of ``repo`` that would be downloaded; None when unknown."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as exc:  # the size check is advisory: no metadata, no check
        print(f"{repo}: size unknown ({type(exc).__name__}); not checking free space", flush=True)
        return None
    return sum(int(s.size or 0) for s in (info.siblings or []) if wanted(s.rfilename))


def download(
    targets: Sequence[Target],
    *,
    snapshot: Callable[..., Any] | None = None,
    repo_bytes: Callable[[str], int | None] = _repo_bytes,
    free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
) -> list[Path]:
    """Download each target not yet marked complete; the folders it downloaded into."""
    if snapshot is None:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download
    done = []
    for target in targets:
        marker = target.folder / MARKER
        if marker.is_file():
            print(f"{target.repo}: already in {target.folder}", flush=True)
            continue
        target.folder.mkdir(parents=True, exist_ok=True)
        need = repo_bytes(target.repo)
        if need is not None:
            free = free_bytes(target.folder)
            if need * HEADROOM > free:
                raise WeightsError(
                    f"{target.repo} needs {need / 2**30:.1f} GiB (the files vLLM loads) but the volume "
                    f"at {target.folder} has {free / 2**30:.1f} GiB free: raise weights.cache.size"
                )
        print(f"{target.repo}: downloading into {target.folder}", flush=True)
        snapshot(
            repo_id=target.repo,
            local_dir=str(target.folder),
            allow_patterns=list(ALLOW_PATTERNS),
            ignore_patterns=list(IGNORE_PATTERNS),
        )
        marker.write_text(f"{target.repo}\n", encoding="utf-8")
        done.append(target.folder)
    return done


def check(folders: Sequence[Path]) -> None:
    """Raise :class:`WeightsError` naming every folder that holds no model."""
    problems = []
    for folder in folders:
        if not (folder / "config.json").is_file():
            problems.append(f"{folder}: no config.json")
        elif not any(folder.glob("*.safetensors")):
            problems.append(f"{folder}: no *.safetensors")
    if problems:
        raise WeightsError(
            "weights are not staged (weights.download.enabled is false): "
            + "; ".join(problems)
            + ". Copy each model's files (config.json, generation_config.json, tokenizer.json, "
            "tokenizer_config.json, special_tokens_map.json, chat_template.jinja, "
            "model.safetensors.index.json, model-*.safetensors) into its folder."
        )


def wait(
    folders: Sequence[Path], *, interval_s: float = 15.0, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Return once every folder carries the download Job's completion marker."""
    for folder in folders:
        while not (folder / MARKER).is_file():
            print(f"waiting for the download Job to fill {folder}", flush=True)
            sleep(interval_s)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in {"download", "wait", "check"}:
        print("usage: python -m serving.cluster.weights download REPO=DIR... | wait DIR... | check DIR...")
        return 2
    command, rest = args[0], args[1:]
    try:
        if command == "download":
            download(parse_targets(rest))
        elif command == "wait":
            wait([Path(p) for p in rest])
        else:
            check([Path(p) for p in rest])
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    raise SystemExit(main())
