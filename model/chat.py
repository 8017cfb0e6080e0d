"""The chat format: a Jinja template (stored with the tokenizer, so Hugging Face's `apply_chat_template` renders
the same text) and the encoder that SFT data and evaluation prompts use.

A tokenizer's own template is used where it has one (an imported model's, e.g. Llama-3's headers). Otherwise the
project's:

    <|system|> You are a helpful assistant.<|end|><|user|> Hi<|end|><|assistant|> Hello!<|end|>

A space after each role token makes the content tokenize as it does in running text ("▁Hello"), which is what
the pretrained model has seen. In the project's own tokenizer the role and end markers are reserved single tokens
(tokenizer spec).
"""

from __future__ import annotations

import functools

import jinja2.sandbox
import numpy as np

ROLES = ("system", "user", "assistant")
END = "<|end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


# As transformers renders chat templates: sandboxed, trim_blocks and lstrip_blocks.
_environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_environment.globals["raise_exception"] = _raise


def template_of(tokenizer) -> tuple[str, str]:
    """(template, where it comes from): the tokenizer folder's own, else the project's."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, f"the tokenizer's own ({tokenizer.directory})"
    return CHAT_TEMPLATE, "the project's (model/chat.py)"


def render(messages: list[dict], add_generation_prompt: bool = False, template: str = CHAT_TEMPLATE,
           tokenizer=None) -> str:
    special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token} if tokenizer else {}
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    # Compiling a template costs about 1 ms and rendering one 0.03 ms: SFT data renders each conversation three
    # times or more (encode_chat), some 6,000 renders for the bundled instruction set.
    return _environment.from_string(template)


def _encode_text(tokenizer, text: str) -> list[int]:
    """Ids of rendered chat text. Templates write BOS and EOS as text (`{{ bos_token }}`): sentencepiece does not
    read its control tokens from text, so those are cut out and given their ids."""
    if tokenizer.kind != "sentencepiece":
        return tokenizer.encode([text])[0]
    ids, rest = [], text
    specials = {t: tokenizer.token_id(t) for t in (tokenizer.bos_token, tokenizer.eos_token) if t}
    while rest:
        at, token = min(((rest.find(t), t) for t in specials if t in rest), default=(-1, None))
        if token is None:
            ids += tokenizer.encode([rest])[0]
            break
        if at:
            ids += tokenizer.encode([rest[:at]])[0]
        ids.append(specials[token])
        rest = rest[at + len(token):]
    return ids


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation in the tokenizer's chat template (model/tokenizer.py), and its loss mask: 1 on
    each assistant reply's tokens and what closes it (what the model must learn to produce), 0 on everything it
    is given. A reply's tokens are those the full text adds after the text that ends with the generation prompt."""
    template, _ = template_of(tokenizer)
    ids = _encode_text(tokenizer, render(messages, add_generation_prompt, template, tokenizer))
    mask = np.zeros(len(ids), dtype=np.int8)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _encode_text(tokenizer, render(messages[:k], True, template, tokenizer))
        start = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
        end = len(_encode_text(tokenizer, render(messages[:k + 1], False, template, tokenizer)))
        mask[start:end] = 1
    return np.asarray(ids, dtype=np.int32), mask
