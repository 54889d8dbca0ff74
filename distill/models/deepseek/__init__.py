"""The DeepSeek-V3 / R1 Mixture-of-Experts decoder (the teacher): config, model, multi-head
latent attention, routed experts and Hugging Face table."""
