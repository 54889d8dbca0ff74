"""The models, one folder per family, each with its config, model and Hugging Face table:
`llama/` (the Llama / Qwen2 dense students) and `deepseek/` (the DeepSeek-V3/R1 MoE teacher:
MLA, routed experts). Beside them the shared pieces: the common config fields (`config`), the
family union (`families`), layers, rope, masks, attention and its one rule, the decoder base,
the HF table machinery (`weights`), and the GGUF and safetensors readers."""
