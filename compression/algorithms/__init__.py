"""The compression algorithms as plain functions: quantization arithmetic, GPTQ, SparseGPT, AWQ,
SmoothQuant, KV-cache FP8, layer-wise reconstruction and distillation fine-tuning."""
