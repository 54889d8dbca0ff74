"""The models: Llama / Qwen2 dense students and the DeepSeek-V3/R1 MoE teacher in Flax NNX, their
building blocks, and the Hugging Face, GGUF and safetensors weight tables and readers."""
