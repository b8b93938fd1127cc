"""Taking a fused adapter where users run models: a GGUF LoRA for llama.cpp and Ollama
(`gguf_lora`), checked in llama.cpp itself (`runtime_check`), a vLLM-ready adapter (`vllm`) and
one merged GGUF file (`merged_gguf`); `pipeline` runs the configured formats."""
