"""`distill serve`: an OpenAI-compatible chat completions server over any MODEL, with request
batching and reasoning split out as `reasoning_content`."""
