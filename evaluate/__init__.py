"""Running GGUF models: perplexity, KL divergence, importance matrices (qtool.evaluate)."""
