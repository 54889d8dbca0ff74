"""`distill train`: fine-tunes a student on traces (`loop.run_train`): the data stream, the
objective, the optimizer, the sharded step, the loop and its checkpoints."""
