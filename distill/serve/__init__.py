"""`distill serve`: OpenAI-compatible chat completions over any loaded model.

Endpoints: `POST /v1/chat/completions` (a JSON answer, or server-sent events with `"stream": true`),
`POST /v1/completions` (vLLM's: `prompt` as text or token ids, `max_tokens`, `temperature`, `seed`,
`logprobs`, and `prompt_logprobs` k, the prompt tokens' log-probabilities with the top k, -1: the
whole vocabulary, which a teacher that scores the student's tokens answers through; no streaming)
and `GET /v1/models`. Every request is submitted to the inference engine (`distill.inference`)
with its own sampling settings: it takes free slots as soon as there are some, beside whatever
else runs, and is never held back by another request's settings or budget. Reasoning inside
`<think>...</think>` comes back split out as `message.reasoning_content`, as vLLM's and
DeepSeek's reasoning parsers do.

Request fields: `model`, `messages` (required), `max_tokens` / `max_completion_tokens`,
`temperature` (default 1.0, as OpenAI), `top_p`, `top_k` (vLLM's extension; 0 or -1 disable it),
`n`, `seed`, `stop`, `stream`, `stream_options.include_usage`, `logprobs` + `top_logprobs` (0-20),
`return_tokens_as_token_ids` (vLLM's: logprob tokens read "token_id:123") and
`chat_template_kwargs` (passed to the chat template). Unknown fields are ignored, like vLLM.
A stream sends text deltas as the request's slots produce them (every host visit of the engine,
a few tokens each) and each choice's logprobs, when asked for, whole in its finishing chunk. A
request that does not fit the engine (prompt plus max_tokens past its `max_len`, `n` past its
slots) is answered 400 with one line; a client that leaves cancels its request.

A `seed` makes a sampled request reproducible: its random stream depends only on the seed and
the choice's index, so it draws the same tokens alone or beside any other requests (and what
`Engine.generate` draws with that seed). A request without one gets a random seed.

The package: `protocol` (the request schemas, errors, streaming text), `jobs` (requests on the
engine: submit, stream, cancel, count), `completions` (the completions answer's log-probabilities,
the prompt's scored beside the engine), `app` (the endpoints, `build_app`, `ServerThread`,
`serve`).
"""
