"""The demo's last stage: export the best student to a Hugging Face directory and check it.

distill reads the export back and must give the trained run's logits (this needs nothing beyond
distill's own dependencies). Where transformers and torch are installed (the `hf` extra:
`pip install 'distill[hf]'`), transformers reloads the export as well, and its logits, chat
template, prompt ids and GREEDY_CHECK greedy tokens are compared with distill's; without them the
stage says in one line that it skipped that check. This module and the benchmarks are the only
places in the package that import torch or transformers, and only inside the check.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

import distill
from distill.export import export
from distill.inference import Engine, EngineConfig
from distill.sampling import SamplingParams

GREEDY_CHECK = 32  # tokens of greedy generation that distill and transformers must agree on
HF_EXTRA = "pip install 'distill[hf]'"


def transformers_missing() -> str | None:
    """Why transformers cannot be used here (None when transformers and torch are both there)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def export_and_check(work: Path, best: str, eval_report: Path, question: dict) -> dict:
    """Export run `work/best` (float32) to `work/export`, reload it with distill and, where
    installed, with transformers. `question`: a held-out {"prompt", "answer"} to decode."""
    out = export(work / best, work / "export", dtype="float32", force=True,
                 eval_report=eval_report)
    ours, tok = distill.load_pretrained(work / best)
    messages = [{"role": "user", "content": question["prompt"]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text)
    probe = np.asarray([ids], np.int32)
    logits = np.asarray(ours(probe))
    reread, _ = distill.load_pretrained(out)
    result = {"dir": str(out), "question": question["prompt"], "reference": question["answer"],
              "distill_logit_diff": float(np.abs(np.asarray(reread(probe)) - logits).max())}
    why = transformers_missing()
    if why is None:
        try:
            result.update(_transformers_check(out, ours, tok, messages, ids, logits))
            return result
        except ImportError as e:  # installed but broken: the check is skipped, not the demo
            why = f"transformers could not be imported ({e})"
    result["transformers_skipped"] = f"{why}; {HF_EXTRA} to run it"
    return result


def _transformers_check(out: Path, ours, tok, messages: list[dict], ids: list[int],
                        logits: np.ndarray) -> dict:
    """transformers' view of the export beside distill's: logits, template, ids, greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    hf_text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    probe = torch.tensor([ids], dtype=torch.long)
    # greedy, past the end-of-sequence token too, so every one of the GREEDY_CHECK tokens counts
    engine = Engine(ours, config=EngineConfig(slots=1, max_len=len(ids) + GREEDY_CHECK),
                    eos_ids=[])
    [mine] = engine.generate([ids], SamplingParams(max_new_tokens=GREEDY_CHECK))
    theirs.generation_config.eos_token_id = None  # no stop: all GREEDY_CHECK tokens
    with torch.no_grad():
        hf_logits = theirs(probe).logits.numpy()
        generated = theirs.generate(probe, do_sample=False, max_new_tokens=GREEDY_CHECK,
                                    pad_token_id=tok.pad_token_id)
    hf_ids = generated[0, len(ids):].tolist()
    answer = hf_ids[:hf_ids.index(tok.eos_token_id)] if tok.eos_token_id in hf_ids else hf_ids
    return {"max_logit_diff": float(np.abs(hf_logits - logits).max()),
            "template_equal": text == hf_text,
            "hf_ids_equal": hf_tok.encode(text, add_special_tokens=False) == ids,
            "greedy_equal": mine.token_ids == hf_ids, "greedy_tokens": len(hf_ids),
            "transformers_completion": hf_tok.decode(answer, skip_special_tokens=True)}


def export_stage(work: Path, best: str, console) -> dict:
    """The demo's last stage on a work directory whose earlier stages are done: export `best`,
    check it, and say in one line when the transformers check is skipped."""
    e = export_and_check(work, best, work / "eval" / "eval.json",
                         read_question(work / "data" / "eval-prompts.jsonl"))
    if "transformers_skipped" in e:
        console.print(f"  skipped the transformers reload check: {e['transformers_skipped']}",
                      markup=False)
    return e


def _transformers_verdict(e: dict) -> str:
    """What the transformers reload check found: logits, template, greedy tokens."""
    return (f"max |logit diff| {e['max_logit_diff']:.2g}, chat template "
            f"{'equal' if e['template_equal'] else 'DIFFERENT'}, greedy {e['greedy_tokens']} "
            f"tokens {'equal' if e['greedy_equal'] else 'DIFFERENT'}")


def stage_result(e: dict) -> str:
    """The export's row in the demo's timing table."""
    head = f"read back by distill (max |logit diff| {e['distill_logit_diff']:.2g})"
    if "transformers_skipped" in e:
        return f"{head}; transformers check skipped"
    return f"{head}; transformers: {_transformers_verdict(e)}"


def summary_line(e: dict) -> str:
    """The export's line in the demo's conclusions."""
    head = (f"export: {e['dir']} read back by distill: max |logit diff| "
            f"{e['distill_logit_diff']:.2g}")
    if "transformers_skipped" in e:
        return f"{head}; the transformers reload check was skipped ({e['transformers_skipped']})"
    return (f"{head}; reloaded with transformers: {_transformers_verdict(e)}; on "
            f"{e['question']!r}: {e['transformers_completion']!r} (reference {e['reference']})")


def read_question(path: Path) -> dict:
    """The first held-out prompt of a JSONL prompts file."""
    return json.loads(path.read_text().splitlines()[0])
