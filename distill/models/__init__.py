"""Students (timm CNN + decoder + bins heads) and teachers (timm transformers, hybrid, HF, ONNX, precomputed)."""
