"""llamadist: run Llama-family models split across devices, processes and hosts."""

from llamadist.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Keep `import llamadist` light: the API pulls in torch only when used.
    if name == "LLM":
        from llamadist.api import LLM
        return LLM
    if name == "SamplingParams":
        from llamadist.generation.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)
