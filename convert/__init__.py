"""HF checkpoint -> GGUF (qtool.convert)."""
