"""qtool: HuggingFace checkpoints to llama.cpp GGUF files, quantized and measured."""

__version__ = "0.1.0"
