"""The LLM behind HDRec's distillation: one chat-completion call over several model formats and backends."""
from llama.backends import ServerError
from llama.generation import Llama
from llama.loaders import ModelLoadError

__all__ = ["Llama", "ModelLoadError", "ServerError"]
