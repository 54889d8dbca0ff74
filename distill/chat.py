"""Chat formatting in one place: the R1 chat template (`R1_DISTILL_CHAT_TEMPLATE`), rendering a
prompt with a tokenizer's chat template, the think tags, how an R1-style completion is written
(`completion_text`) and how it splits into reasoning and answer (`split_think` for traces and
eval, `split_reasoning` for the server's `reasoning_content`).

R1-style chat templates end the generation prompt with `<think>\\n` (`REASONING_START`), so a
completion usually closes a think block it never opened.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.errors import DistillError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_START = THINK_OPEN + "\n"  # what an R1 generation prompt ends with

# The DeepSeek-R1-Distill template (tokenizer_config.json of the six distills, current version):
# the last system message goes raw after BOS, reasoning up to `</think>` is dropped from assistant
# turns, and the generation prompt opens a think block.
R1_DISTILL_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def completion_text(reasoning: str, answer: str) -> str:
    """An R1 completion after the generation prompt: the reasoning, `</think>`, the answer."""
    return f"{reasoning}\n{THINK_CLOSE}\n\n{answer}"


@dataclass(frozen=True)
class ThinkSplit:
    """A completion split at its think block.

    `reasoning`: the text inside the think block, stripped (None when there is no tag at all);
    `answer`: the text after `</think>`, stripped ("" when the block never closes; the whole text
    when there are no tags); `opened` / `closed`: whether a think block was begun / ended.
    """

    reasoning: str | None
    answer: str
    opened: bool
    closed: bool


def _parts(text: str, opened: bool | None) -> tuple[str | None, str | None]:
    """(reasoning, answer), unstripped: reasoning None without a think block, answer None while
    the block is unclosed. `opened`: True, the prompt opened the block; False, only a text that
    starts with `<think>` opens one; None (not known), a `</think>` ends a block whether or not a
    `<think>` began it, and a `<think>` anywhere begins one."""
    if opened is False:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        text, opened = stripped[len(THINK_OPEN):], True
    head, sep, tail = text.partition(THINK_CLOSE)
    if opened:
        return head, tail if sep else None
    if sep:
        start = head.find(THINK_OPEN)
        return (head[start + len(THINK_OPEN):] if start >= 0 else head), tail
    start = text.find(THINK_OPEN)
    return (text[start + len(THINK_OPEN):], None) if start >= 0 else (None, text)


def split_think(completion: str) -> ThinkSplit:
    """Split a stored completion into reasoning and answer at the first `</think>` (whether the
    prompt opened the block is not known: a `</think>` alone closes one)."""
    reasoning, answer = _parts(completion, None)
    return ThinkSplit(None if reasoning is None else reasoning.strip(), (answer or "").strip(),
                      opened=reasoning is not None,
                      closed=reasoning is not None and answer is not None)


def generated_text(completion: str) -> str:
    """The text an R1-style model generated after a generation prompt that opened the think block,
    whichever backend returned it: a leading `<think>` (what the HTTP backend puts back before a
    server's `reasoning_content`) and the whitespace before and after it removed. So a completion
    that never closed its think block reads the same in process and over HTTP."""
    stripped = completion.lstrip()
    return stripped[len(THINK_OPEN):].lstrip() if stripped.startswith(THINK_OPEN) else stripped


def hold_back(text: str, tags) -> str:
    """`text` without its longest suffix that is a proper prefix of one of `tags` (what a growing
    text may still turn into a tag)."""
    longest = max((len(t) for t in tags), default=1) - 1
    for k in range(min(len(text), longest), 0, -1):
        if any(t.startswith(text[-k:]) for t in tags):
            return text[:-k]
    return text


def split_reasoning(text: str, opened: bool, final: bool = True) -> tuple[str | None, str | None]:
    """Split a completion into (reasoning, content), as OpenAI-style reasoning parsers do: None for
    a part that is not there (no think block: (None, text); unclosed: (reasoning, None)), the
    reasoning stripped and the content without the whitespace after `</think>`.

    `opened`: the prompt ended inside a think block; else a completion that starts with `<think>`
    opens one itself. `final=False` reads `text` as the start of a longer completion (streaming):
    whatever may still become a tag, or whitespace before one, is held back, so later results only
    extend earlier ones.
    """
    if not final and not opened:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN) and THINK_OPEN.startswith(stripped):
            return None, None  # may still become "<think>"
    reasoning, content = _parts(text, opened)
    if reasoning is None:
        return None, content
    if content is None:
        return (reasoning if final else hold_back(reasoning, [THINK_CLOSE])).strip(), None
    return reasoning.strip(), content.lstrip()


def prompt_ids(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of a user prompt: rendered with the chat template unless `raw`."""
    if raw:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not tokenizer.chat_template:
        raise DistillError("this model's tokenizer has no chat template; use --raw")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# R1's own writing of a think block's end (`completion_text`): what a template that never renders
# reasoning (the R1-Distill template drops it from assistant turns) is taken to mean.
R1_THINK_END = "\n" + THINK_CLOSE + "\n\n"
_PROBE_REASONING, _PROBE_ANSWER = "PROBE-REASONING", "PROBE-ANSWER"


def has_think_block(tokenizer) -> bool:
    """Whether the tokenizer's chat template knows a think block (names `<think>` or `</think>`)."""
    template = tokenizer.chat_template or ""
    return THINK_OPEN in template or THINK_CLOSE in template


def think_end(tokenizer) -> str:
    """The text that ends a think block as the tokenizer's chat template renders it between an
    assistant turn's reasoning and its answer (Qwen3's: "\\n</think>\\n\\n"); R1's writing
    (`R1_THINK_END`) where the template drops the reasoning of the turns it renders."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": (
        f"{REASONING_START}{_PROBE_REASONING}{R1_THINK_END}{_PROBE_ANSWER}")}]
    text = tokenizer.apply_chat_template(messages)
    end = text.rfind(_PROBE_ANSWER)
    start = text.rfind(_PROBE_REASONING, 0, max(end, 0))
    between = text[start + len(_PROBE_REASONING):end] if 0 <= start < end else ""
    return between if THINK_CLOSE in between else R1_THINK_END


def prompt_opens_think(prompt_text: str) -> bool:
    """Whether a rendered generation prompt leaves a think block open (R1's ends with `<think>\\n`)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def think_parts(text: str, opened: bool) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a completion, unstripped: reasoning None without a think block,
    answer None while the block is open (see `split_reasoning` for `opened`)."""
    return _parts(text, opened)
