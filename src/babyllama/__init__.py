"""babyllama: build a small Chinese chat LLM by hand, every stage readable and tested."""

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "load"]


def load(path, device: str = "auto"):
    """Open a run directory (or a transformers Llama directory) for generation."""
    from babyllama.llm import LLM

    return LLM.load(path, device)


from babyllama.infer.config import GenerationConfig  # noqa: E402  (light: a dataclass)
