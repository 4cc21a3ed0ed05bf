"""How a decoder's input is written: the project's plain text, or the model's own chat template.

Under `chat` an example is the conversation its users would write, rendered by the tokenizer's own template
(`tokenizer.apply_chat_template`, never a hand-written copy of it):

    user:       "<instruction>\\n" [soft prompt] "<formatted input>"
    assistant:  "<label>"                    (the end-of-turn token after it is a label token too)

The soft prompt sits inside the user turn, after the instruction and before the input, so what comes before
it (the template's head: a system turn if the template writes one, the user turn's opening, the
instruction) is the same for every example of a task. `ChatFormat` splits the rendering there once per task:
`head` (text before the soft prompt), `suffix` (text after the input: the end of the user turn and the
assistant's opening, where the answer goes) and `answer_end` (text after the assistant's answer).
The decoder prepends the head's embeddings to the soft prompt, so the prompt stays in front of everything
that depends on the example and its key/value cache is still shared by the rows of a task. A prompt
initialised from the instruction takes the place of the head's last tokens instead (crosspt.backbones.decoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from crosspt.errors import ConfigError


class Template(str, Enum):
    """How a decoder's input is written (config `backbone.template`)."""
    AUTO = "auto"      # chat when the tokenizer has a chat template, else plain
    CHAT = "chat"      # the tokenizer's chat template: instruction + input as the user, label as the assistant
    PLAIN = "plain"    # "<task>: <field>: X\\nanswer:" then the label (crosspt.backbones.decoder)


# Stand-ins for the soft prompt, the input and the answer while the template renders: text no template
# writes itself, so each splits the rendering at exactly one place.
_PROMPT, _INPUT, _ANSWER = "\u2063CROSSPT_PROMPT\u2063", "\u2063CROSSPT_INPUT\u2063", "\u2063CROSSPT_ANSWER\u2063"


def resolve_template(template: str, tokenizer) -> Template:
    """`template` with auto resolved: chat when `tokenizer` has a chat template. ConfigError for chat
    without one."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    t = Template(template)
    if t == Template.AUTO:
        return Template.CHAT if has_chat else Template.PLAIN
    if t == Template.CHAT and not has_chat:
        raise ConfigError("backbone.template is 'chat' but the backbone's tokenizer has no chat template "
                          "(use 'plain' or 'auto')")
    return t


def _split_once(text: str, marker: str, what: str) -> tuple[str, str]:
    parts = text.split(marker)
    if len(parts) != 2:
        raise ConfigError(f"the tokenizer's chat template writes the {what} {len(parts) - 1} times, not once: "
                          f"crosspt cannot place it (use backbone.template: plain)")
    return parts[0], parts[1]


@dataclass(frozen=True)
class ChatFormat:
    """One task's conversation around its examples (see the module docstring): `head` + [soft prompt] +
    input + `suffix` + answer + `answer_end`."""
    head: str
    suffix: str
    answer_end: str

    @classmethod
    def render(cls, tokenizer, instruction: str) -> "ChatFormat":
        """Split the tokenizer's chat template around a task's soft prompt, input and answer."""
        user = {"role": "user", "content": f"{instruction}\n{_PROMPT}{_INPUT}"}
        asked = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        answered = tokenizer.apply_chat_template([user, {"role": "assistant", "content": _ANSWER}], tokenize=False)
        head, rest = _split_once(asked, _PROMPT, "soft prompt")
        between, suffix = _split_once(rest, _INPUT, "input")
        if between:
            raise ConfigError("the tokenizer's chat template writes text between the soft prompt and the input")
        before_answer, answer_end = _split_once(answered, _ANSWER, "answer")
        if before_answer != asked:
            # e.g. a template that adds reasoning tags only to past assistant turns: training would then
            # show the model another prefix than generation does
            raise ConfigError("the tokenizer's chat template writes an answered conversation differently from "
                              "the question it asks (use backbone.template: plain)")
        return cls(head=head, suffix=suffix, answer_end=answer_end)
