"""The Llama and Qwen2 dense decoders (the students): config, model and Hugging Face table."""
