"""The registries of the attention settings, as plain data (it imports nothing), so that the
command line's help lists them without importing pydantic or JAX. The config fields' types
(`distill.models.config.AttentionName`, `ContextParallelName`) are made from them;
`distill.models.attention.attention_path` is the rule that turns a setting into the path of one
call.
"""

# name -> what it picks (distill-only: never written to config.json)
ATTENTION = {
    "auto": "the platform's fused kernel where it applies, else blockwise (dense on CPU below "
            "2,048 tokens)",
    "dense": "the [B, T, S] mask and float32 scores",
    "blockwise": "block by block in O(T) memory (online softmax, every backend)",
    "splash": "Pallas splash attention (TPU)",
    "cudnn": "cuDNN flash attention (GPU)",
    "pallas_gpu": "Pallas (Triton) flash attention (GPU)",
}

# attention over a mesh's `context` axis (`distill.models.context`): name -> how
CONTEXT_PARALLEL = {
    "all_gather": "gather every device's keys and values",
    "ring": "pass the keys and values round a ring, one chunk in memory at a time",
}
