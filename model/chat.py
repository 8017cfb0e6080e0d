"""The chat format, defined once: a Jinja template (stored with the tokenizer, so Hugging Face's
`apply_chat_template` renders the same text) and the encoder that SFT data and evaluation prompts use.

    <|system|> You are a helpful assistant.<|end|><|user|> Hi<|end|><|assistant|> Hello!<|end|>

A space after each role token makes the content tokenize as it does in running text ("▁Hello"), which is what
the pretrained model has seen. The role and end markers are reserved single tokens (tokenizer spec).
"""

from __future__ import annotations

import jinja2
import numpy as np

ROLES = ("system", "user", "assistant")
END = "<|end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_template = jinja2.Environment(autoescape=False).from_string(CHAT_TEMPLATE)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return _template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def encode_chat(sp, messages: list[dict], add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation and its loss mask: 1 on each assistant reply's tokens and its closing
    <|end|> (what the model must learn to produce), 0 on everything it is given."""
    ids = np.asarray(sp.encode(render(messages, add_generation_prompt)), dtype=np.int32)
    assistant, end = sp.piece_to_id("<|assistant|>"), sp.piece_to_id(END)
    mask = np.zeros(len(ids), dtype=np.int8)
    inside = False
    for i, token in enumerate(ids):
        if inside:
            mask[i] = 1
            inside = token != end
        elif token == assistant:
            inside = True
    return ids, mask
