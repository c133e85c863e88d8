"""GGUF -> quantized GGUF (qtool.quantize)."""
