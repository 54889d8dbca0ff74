"""Thinking budgets (s1 budget forcing, `distill.backends.forcing`): what the model is handed after
a forced close or wait is the chat template's rendering of the forced text (R1, Qwen3-style and
SmolLM2 vocabularies), a run's bookkeeping, local and served forcing agreeing, the
--thinking-budgets sweep, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill.backends.base import Piece
from distill.backends.forcing import BudgetForced, Forcing
from distill.chat import R1_DISTILL_CHAT_TEMPLATE, R1_THINK_END, think_end
from distill.data.records import PromptRecord
from distill.errors import DistillError
from distill.sampling import SamplingParams

from . import vocabularies
from .helpers import assert_user_error, invoke_cli

REPO = Path(__file__).resolve().parents[1]

# The assistant-turn part of Qwen3's chat template (Qwen/Qwen3-8B tokenizer_config.json,
# "chat_template", at 895c8d1): the reasoning of a turn after the last user message is rendered
# as "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n"); the
# generation prompt does not open the block (the model writes "<think>\n" itself).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Thinking that ends in punctuation: in byte-level BPE ".\n" is one piece of the whole text, so
# ids of the thinking followed by ids of the close would not be the rendering's ids.
THINKING = "Okay, 17 * 3 = 51, and 51 + 4 = 55. So the answer is 55."
QUESTION = "What is 17 * 3 + 4?"


class Scripted:
    """An Extender that answers each round from a script and records the prefixes it got."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.asked = tokenizer, list(script), []
        self.identity, self.tokenizer_identity = {"kind": "scripted"}, None

    def extend(self, prefixes, params, reserve=0):
        self.asked += [(list(p), q) for p, q in zip(prefixes, params, strict=True)]
        return [self.script.pop(0) for _ in prefixes]

    def close(self):
        pass


def with_template(tokenizer, template):
    out = tokenizer.__class__.__new__(tokenizer.__class__)
    out.__dict__.update(tokenizer.__dict__)
    out.chat_template = template
    return out


@pytest.fixture(scope="module", params=["r1", "qwen3", "smollm2"])
def templated(request, smollm2_tokenizer):
    """(tokenizer with a think-block template, what the model writes before its thinking)."""
    if request.param == "r1":  # DeepSeek-R1's vocabulary, R1's template (opens the block)
        return with_template(vocabularies.deepseek_r1(), R1_DISTILL_CHAT_TEMPLATE), ""
    base = vocabularies.qwen25() if request.param == "qwen3" else smollm2_tokenizer
    return with_template(base, QWEN3_TEMPLATE), "<think>\n"


def rendered_until_answer(tokenizer, opening: str) -> str:
    """The chat template's rendering of the question and a turn whose thinking ends in a close,
    up to where the answer begins."""
    messages = [{"role": "user", "content": QUESTION}]
    if not opening:  # R1's template drops reasoning: the generation prompt, then R1's writing
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return prompt + THINKING + R1_THINK_END
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "ANSWER", "reasoning_content": THINKING}])
    return text[:text.index("ANSWER")]


@pytest.mark.parametrize("cut", ["", "\n"])
def test_forced_close_is_the_templates_rendering(templated, cut):
    """Cut after a word, or after a newline (which the template does not render twice)."""
    tokenizer, opening = templated
    assert think_end(tokenizer) == "\n</think>\n\n"
    budget = len(tokenizer.encode(opening + THINKING + cut))
    script = [Piece(opening + THINKING + cut, budget, "length"), Piece(" 55", 2, "stop")]
    forced = BudgetForced(Scripted(tokenizer, script), Forcing(budget=budget), "m")
    [[sample]] = forced.complete([PromptRecord("p", QUESTION)],
                                 SamplingParams(max_new_tokens=budget + 20))
    (_, first), (continued, second) = forced.sampler.asked
    want = tokenizer.encode(rendered_until_answer(tokenizer, opening), add_special_tokens=False)
    assert continued == want
    end_ids = tokenizer.encode(R1_THINK_END)
    assert first.max_new_tokens == budget
    assert second.max_new_tokens == 20 - len(end_ids)  # what was generated counts, stripped or not
    assert sample.completion == opening + THINKING + R1_THINK_END + " 55"
    assert (sample.thinking.tokens, sample.thinking.forced, sample.finish_reason) == (
        budget, True, "stop")
    assert sample.completion_tokens == budget + len(end_ids) + 2


def test_ids_joined_piecewise_would_differ():
    """The rendering test can fail: the thinking's ids followed by the close's are not the
    template's ids for the same text."""
    tokenizer = with_template(vocabularies.qwen25(), QWEN3_TEMPLATE)
    whole = tokenizer.encode("<think>\n" + THINKING + R1_THINK_END)
    pieces = tokenizer.encode("<think>\n" + THINKING) + tokenizer.encode(R1_THINK_END)
    assert whole != pieces


def test_wait_replaces_an_early_close(templated):
    tokenizer, opening = templated
    early = opening + "Okay, 51 + 4 = 55."
    n = len(tokenizer.encode(early))
    script = [Piece(early + R1_THINK_END + "55", n + 5, "stop"),
              Piece(" no, check: 17 * 3 = 51." + R1_THINK_END + "\\boxed{55}", 40, "stop")]
    forced = BudgetForced(Scripted(tokenizer, script),
                          Forcing(budget=200, min_thinking=n + 2, wait="Wait"), "m")
    [[sample]] = forced.complete([PromptRecord("p", QUESTION)], SamplingParams(max_new_tokens=300))
    _, (continued, second) = forced.sampler.asked
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           add_generation_prompt=True)
    wait = early + "\n" + "Wait"  # the close (only the tag) replaced, the text after it dropped
    assert continued == tokenizer.encode(prompt + wait, add_special_tokens=False)
    assert sample.completion.startswith(wait + " no, check")
    assert sample.thinking.waits == 1 and not sample.thinking.forced
    # thinking counts the text before each `</think>` and the wait text
    first = len(tokenizer.encode(early + "\n")) + len(tokenizer.encode("Wait"))
    assert second.max_new_tokens == 200 - first
    assert sample.thinking.tokens == first + len(tokenizer.encode(" no, check: 17 * 3 = 51.\n"))


def test_a_close_within_the_budget_is_left_alone(tok):
    """A sample that closes its thinking and is cut at the budget in its answer goes on
    answering, from where it was (nothing inserted)."""
    first = "12 + 3 = 15" + R1_THINK_END + "The ans"
    budget = len(tok.encode(first))
    script = [Piece(first, budget, "length"), Piece("wer is 15.", 4, "stop")]
    forced = BudgetForced(Scripted(tok, script), Forcing(budget=budget), "m")
    [[sample]] = forced.complete([PromptRecord("p", "q")], SamplingParams(max_new_tokens=40))
    assert sample.completion == "12 + 3 = 15" + R1_THINK_END + "The answer is 15."
    assert not sample.thinking.forced
    assert sample.thinking.tokens == len(tok.encode("12 + 3 = 15\n"))
    assert sample.completion_tokens == budget + 4 and sample.finish_reason == "stop"
    assert forced.sampler.asked[1][1].max_new_tokens == 40 - budget


def test_answer_prefix_follows_a_forced_close_only(tok):
    script = [Piece("1 + 2 = 3", 4, "length"), Piece("4" + R1_THINK_END + "\\boxed{4}", 4, "stop"),
              Piece("3}", 2, "stop")]  # round 1: both samples; round 2: the forced one
    forced = BudgetForced(Scripted(tok, script), Forcing(budget=4, answer_prefix="\\boxed{"), "m")
    [[one, two]] = forced.complete([PromptRecord("p", "q")], SamplingParams(max_new_tokens=40, n=2))
    assert one.completion == "1 + 2 = 3" + R1_THINK_END + "\\boxed{3}" and one.thinking.forced
    assert two.completion == "4" + R1_THINK_END + "\\boxed{4}" and not two.thinking.forced


def test_a_template_without_a_think_block_is_refused(smollm2_tokenizer):
    with pytest.raises(DistillError, match="m: the chat template has no think block"):
        BudgetForced(Scripted(smollm2_tokenizer, []), Forcing(budget=8), "m")


# ---------------------------------------------------------------------------------------------
# A real model, in process and served


def test_local_and_served_forcing_give_the_same_text(toy_qwen2_dir):
    from distill.backends.http import OpenAISampler, OpenAISamplerConfig
    from distill.backends.jax import JaxSampler, JaxSamplerConfig
    from distill.inference import EngineConfig
    from distill.serve.app import ServerThread, build_app

    shape = EngineConfig(slots=4, max_len=64)  # small programs, the same on both sides
    local = JaxSampler(JaxSamplerConfig(model=str(toy_qwen2_dir), engine=shape))
    prompts = [PromptRecord("a", "1 + 2?"), PromptRecord("b", "3 * 4?")]
    params = SamplingParams(max_new_tokens=14, n=2, temperature=1.0, seed=3)
    forcing = Forcing(budget=6)
    ours = BudgetForced(local, forcing, "local").complete(prompts, params)
    with ServerThread(build_app(local.model, local.tokenizer, "toy", config=shape)) as url:
        served = OpenAISampler(OpenAISamplerConfig(base_url=f"{url}/v1", model="toy",
                                                   tokenizer=str(toy_qwen2_dir)))
        theirs = BudgetForced(served, forcing, "served").complete(prompts, params)
        served.close()
    texts = [[s.completion for s in g] for g in ours]
    assert texts == [[s.completion for s in g] for g in theirs]
    flat = [s for g in ours for s in g]
    assert all(s.thinking.tokens <= 6 for s in flat)
    assert any(s.thinking.forced and R1_THINK_END in s.completion for s in flat)
    assert len({s.completion for s in flat}) == 4  # seeded per sample


# ---------------------------------------------------------------------------------------------
# The command line


def eval_config(path: Path, model: Path, **protocol) -> Path:
    path.write_text(yaml.safe_dump({
        "prompts": {"source": "synthetic", "synthetic": {"n": 3, "seed": 1}},
        "models": [{"name": "toy", "model": str(model), "engine": {"slots": 4, "max_len": 256}}],
        "protocol": {"n": 1, "max_new_tokens": 12, "greedy": False, **protocol},
        "output": str(path.parent / "out")}))
    return path


@pytest.mark.parametrize("args, needles", [
    (["--thinking-budgets", "0,8"], ["--thinking-budgets", "at least 1 token"]),
    (["--thinking-budgets", "8,x"], ["--thinking-budgets", "whole numbers"]),
    (["--set", "protocol.thinking_budget=0"], ["protocol.thinking_budget"]),
    (["--set", "protocol.thinking_budget=-3"], ["protocol.thinking_budget"]),
    (["--thinking-budgets", "4,12"], ["thinking_budget 12 leaves no room", "max_new_tokens 12"]),
])
def test_bad_budgets_are_one_line_and_exit_2(tmp_path, toy_qwen2_dir, args, needles):
    cfg = eval_config(tmp_path / "eval.yaml", toy_qwen2_dir)
    assert_user_error(invoke_cli(["eval", cfg, "--quiet", *args], cwd=REPO), *needles)
    assert not (tmp_path / "out").exists()


def test_a_budget_on_a_model_without_a_think_block_is_one_line_and_exit_2(tmp_path,
                                                                           toy_qwen2_dir):
    model = tmp_path / "chatml"
    shutil.copytree(toy_qwen2_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + "
                               "m['content'] + '<|im_end|>\\n'}}{% endfor %}"
                               "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}"
                               "{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = eval_config(tmp_path / "eval.yaml", model, thinking_budget=4)
    assert_user_error(invoke_cli(["eval", cfg, "--quiet"], cwd=REPO),
                      "toy: the chat template has no think block")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_thinking_budgets_sweep(tmp_path, toy_qwen2_dir):
    """`distill eval --thinking-budgets`: a report per budget and the summary beside them."""
    cfg = eval_config(tmp_path / "eval.yaml", toy_qwen2_dir)
    proc = invoke_cli(["eval", cfg, "--quiet", "--thinking-budgets", "6,3"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert proc.stdout.strip().endswith(str(out)) and "| 3 |" in proc.stdout
    summary = json.loads((out / "budgets.json").read_text())
    assert summary["budgets"] == [3, 6]
    [model] = summary["models"]
    for point, budget in zip(model["points"], [3, 6], strict=True):
        report = json.loads((out / f"budget-{budget}" / "eval.json").read_text())
        assert report["protocol"]["thinking_budget"] == budget
        assert f"thinking budget {budget} tokens" in (out / f"budget-{budget}" / "eval.md").read_text()
        assert point["pass@1"] == report["models"][0]["pass@1"]
        assert point["answered"] == report["models"][0]["answered"]
        assert 0 < point["mean_thinking_tokens"] <= budget
        rows = [json.loads(line) for line in
                (out / f"budget-{budget}" / "samples.jsonl").read_text().splitlines()]
        assert all(r["thinking_tokens"] <= budget for r in rows)
    assert (out / "plots" / "accuracy_vs_thinking.png").stat().st_size > 1000
    assert "| 6 |" in (out / "budgets.md").read_text()
