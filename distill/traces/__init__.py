"""Teacher traces: prompt sources, teacher backends, answer checking and filters, the shard store,
and `distill generate`, which ties them together."""
