"""Model path resolution and format conversion (GGUF -> HF folder)."""
