"""``python -m loadtest.sim``: serve a simulated engine (planning and test tool)."""

from __future__ import annotations

from collections.abc import Callable

import click

from loadtest.sim.profile import EngineProfile, load_profile
from loadtest.sim.server import SimEngine, build_app, word_token_ids


def hf_token_ids(folder: str) -> Callable[[str], list[int]]:
    """Token ids from a Hugging Face ``tokenizer.json`` (needs the ``tokenizers`` package)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(folder).expanduser()
    tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))

    def encode(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False).ids)

    return encode


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--model", default="sim-model", show_default=True, help="Model id to serve.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
@click.option("--tokenizer", default="words", show_default=True, help="'words' or 'hf:<folder>'.")
def main(profile_path: str | None, model: str, host: str, port: int, tokenizer: str) -> None:
    """Serve a SIMULATED OpenAI-compatible engine (timing from a profile; filler text)."""
    import uvicorn

    profile = load_profile(profile_path) if profile_path else EngineProfile()
    encode = hf_token_ids(tokenizer[3:]) if tokenizer.startswith("hf:") else word_token_ids
    engine = SimEngine(profile, model, encode)
    uvicorn.run(build_app(engine), host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
