"""llama.cpp interop: our quantized weights as exact GGUF blocks, the model and its LoRA as GGUF files."""
