"""`distill demo`: the whole pipeline at toy scale on a CPU, on data and models it makes itself
(`pipeline.run_demo`), with its tokenizer and its export check."""
