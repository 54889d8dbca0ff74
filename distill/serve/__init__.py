"""`distill serve`: OpenAI-compatible chat completions over any loaded model.

Endpoints: `POST /v1/chat/completions` (a JSON answer, or server-sent events with `"stream": true`)
and `GET /v1/models`. Requests queue for one batching worker thread, which runs every waiting
request with compatible sampling settings through one `distill.sampling.generate` call. Reasoning
inside `<think>...</think>` comes back split out as `message.reasoning_content`, as vLLM's and
DeepSeek's reasoning parsers do.

Request fields: `model`, `messages` (required), `max_tokens` / `max_completion_tokens`,
`temperature` (default 1.0, as OpenAI), `top_p`, `top_k` (vLLM's extension; 0 or -1 disable it),
`n`, `seed`, `stop`, `stream`, `stream_options.include_usage`, `logprobs` + `top_logprobs` (0-20),
`return_tokens_as_token_ids` (vLLM's: logprob tokens read "token_id:123") and
`chat_template_kwargs` (passed to the chat template). Unknown fields are ignored, like vLLM.
A stream sends text deltas as decoding proceeds (every STOP_CHECK_EVERY tokens) and each choice's
logprobs, when asked for, whole in its finishing chunk.

A `seed` makes a sampled request reproducible when it runs alone (it then draws exactly what
`generate` with that seed draws); batched with other requests, its rows share one random stream
with theirs. `max_batch=1` makes every seeded request reproducible.

The package: `protocol` (the request schema, errors, streaming text), `engine` (the batching
worker), `app` (the endpoints, `build_app`, `ServerThread`, `serve`).
"""
