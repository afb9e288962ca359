"""Synthetic BitNet GGUF writers (presets for benchmarks and tests): models.py writes models,
vocab.py the deterministic vocabularies they carry.  gguf/ only reads."""
