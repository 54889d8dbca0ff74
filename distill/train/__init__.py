"""Student training: the data pipeline (chat rendering, loss masks, packing, resumable order), the
losses (SFT cross-entropy and top-k logit distillation, chunked over the sequence), the training
step, the loop and its checkpoints."""
