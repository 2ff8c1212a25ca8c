"""oss-serving: gpt-oss as an OpenAI-compatible API on Ray Serve + vLLM."""

__version__ = "0.1.0"
