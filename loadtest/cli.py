"""`oss-loadtest` command line."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Load-test any OpenAI-compatible endpoint and plan capacity."""


if __name__ == "__main__":
    main()
