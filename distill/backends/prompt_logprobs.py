"""Serving engines' answers with the log-probabilities of the tokens they were given, read into
`TokenScores` (the completion part of the prompt), and the requests that ask for them.

vLLM (and `distill serve`): POST /v1/completions with `prompt` = token ids, `max_tokens` 1 and
`prompt_logprobs` k (-1: the whole vocabulary). `choices[0].prompt_logprobs` has one entry per
prompt token: null for the first, then {"<token id>": {"logprob", "rank", "decoded_token"}} holding
the prompt token itself and the top k (k + 1 entries when the token is not among them). Source:
vllm/entrypoints/openai/protocol.py (`CompletionResponseChoice.prompt_logprobs:
list[dict[int, Logprob] | None]`) and vllm/logprobs.py (`Logprob`: logprob, rank, decoded_token;
"the logprob of the first prompt token is None").

SGLang: POST /generate with `input_ids`, `return_logprob` true, `logprob_start_len` 0 and
`top_logprobs_num` k. `meta_info.input_token_logprobs` is [[logprob, token id, text | null], ...]
over the input tokens, the first logprob null; `meta_info.input_top_logprobs` one entry per input
token, null or [[logprob, id, text | null], ...] (the top k, most likely first). Source:
python/sglang/srt/managers/tokenizer_manager.py (`detokenize_logprob_tokens`,
`detokenize_top_logprobs_tokens`) and docs.sglang.io "Sampling Parameters" / "Native APIs".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill.errors import DistillError
from distill.inference import TokenScores

# what a server lacking prompt log-probabilities is told to turn on, per `scoring`
ENABLE = {
    "vllm": "prompt_logprobs on /v1/completions is a vLLM extension (vLLM, distill serve); for an "
            "SGLang server set scoring: sglang",
    "sglang": "SGLang's /generate returns meta_info.input_token_logprobs with return_logprob; for "
              "vLLM or distill serve set scoring: vllm",
}


def vllm_body(model: str, ids: Sequence[int], top_k: int | None) -> dict:
    """The /v1/completions body asking for the prompt's log-probabilities (k: top_k, -1: all)."""
    return {"model": model, "prompt": [int(i) for i in ids], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": -1 if top_k is None else int(top_k)}


def sglang_body(ids: Sequence[int], top_k: int | None, vocab_size: int | None) -> dict:
    """The /generate body asking for the input's log-probabilities (and the top k)."""
    k = vocab_size if top_k is None else int(top_k)
    return {"input_ids": [int(i) for i in ids],
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
            "return_text_in_logprobs": False}


def parse_vllm(data: dict, prompt_len: int, completion: Sequence[int], top_k: int | None,
               url: str) -> TokenScores:
    """The completion's scores from a vLLM /v1/completions answer (see the module)."""
    try:
        entries = data["choices"][0].get("prompt_logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise DistillError(f"{url}: unexpected answer (no choices[0])") from None
    if entries is None:
        raise DistillError(f"{url}: the answer has no prompt_logprobs, so this server cannot score "
                           f"tokens ({ENABLE['vllm']})")
    _check_length(len(entries), prompt_len + len(completion), url)
    try:
        rows = [{int(i): float(e["logprob"]) for i, e in row.items()}
                for row in entries[prompt_len:]]
        logprobs = [row[int(c)] for c, row in zip(completion, rows, strict=True)]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DistillError(f"{url}: malformed prompt_logprobs in the answer (each entry a dict "
                           "keyed by token id, holding the prompt token)") from None
    return _scores(logprobs, [sorted(r.items(), key=lambda e: -e[1]) for r in rows], top_k, url)


def parse_sglang(data: dict, prompt_len: int, completion: Sequence[int], top_k: int | None,
                 url: str) -> TokenScores:
    """The completion's scores from an SGLang /generate answer (see the module)."""
    meta = data.get("meta_info") if isinstance(data, dict) else None
    tokens = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    if tokens is None:
        raise DistillError(f"{url}: the answer has no meta_info.input_token_logprobs, so this "
                           f"server cannot score tokens ({ENABLE['sglang']})")
    _check_length(len(tokens), prompt_len + len(completion), url)
    try:
        tokens = tokens[prompt_len:]
        if any(int(t[1]) != int(c) for t, c in zip(tokens, completion, strict=True)):
            raise DistillError(f"{url}: the answer scores other tokens than those sent")
        logprobs = [float(t[0]) for t in tokens]
        tops = []
        if top_k != 0:
            rows = (meta.get("input_top_logprobs") or [])[prompt_len:]
            _check_length(len(rows), len(completion), url, "input_top_logprobs")
            tops = [[(int(e[1]), float(e[0])) for e in row] for row in rows]
    except (KeyError, IndexError, TypeError, ValueError):
        raise DistillError(f"{url}: malformed meta_info.input_token_logprobs / input_top_logprobs "
                           "in the answer") from None
    return _scores(logprobs, tops, top_k, url)


def _check_length(got: int, want: int, url: str, what: str = "prompt log-probabilities") -> None:
    if got != want:
        raise DistillError(f"{url}: {got} {what} in the answer for {want} tokens sent")


def _scores(logprobs: list[float], tops: list[list[tuple[int, float]]], top_k: int | None,
            url: str) -> TokenScores:
    """TokenScores from the completion tokens' log-probs and, per token, (id, logprob) entries
    most likely first: the first k of them, or (top_k None) all of them by id."""
    lps = np.asarray(logprobs, np.float32)
    if top_k == 0:
        return TokenScores(lps)
    if top_k is None:
        width = len(tops[0]) if tops else 0
        full = np.full((len(tops), width), -np.inf, np.float32)
        for t, row in enumerate(tops):
            ids = [i for i, _ in row]
            if len(row) != width or sorted(ids) != list(range(width)):
                raise DistillError(f"{url}: asked for the whole vocabulary but a position has "
                                   f"{len(row)} entries")
            full[t, ids] = [v for _, v in row]
        return TokenScores(lps, np.broadcast_to(np.arange(width, dtype=np.int32),
                                                full.shape).copy(), full)
    if any(len(row) < top_k for row in tops):
        raise DistillError(f"{url}: asked for the top {top_k} but a position has fewer entries")
    return TokenScores(lps, np.asarray([[i for i, _ in row[:top_k]] for row in tops],
                                       np.int32).reshape(-1, top_k),
                       np.asarray([[v for _, v in row[:top_k]] for row in tops],
                                  np.float32).reshape(-1, top_k))
