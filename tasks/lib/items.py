"""The items of instruction and evaluation sets, read from source records (tasks/lib/sources.py): a conversation
(chat messages) and a multiple-choice question. Shared by sft_data (conversations), the evaluation
(multiple-choice items) and decontaminate (both: the n-grams it protects). A record that cannot be used comes back
as None with the reason, which the caller quarantines or counts."""

from __future__ import annotations

from model.chat import ROLES
from tasks.lib.sources import Record
from tasks.spec import InstructionSourceSpec, MultipleChoiceSpec


def conversation(rec: Record, source: InstructionSourceSpec, system_prompt: str | None) -> tuple[list | None, str]:
    """The record as chat messages, or None and the reason it cannot be used."""
    if rec.problem:
        return None, rec.problem
    raw = rec.raw
    if not isinstance(raw, dict):
        return None, f"not a JSON object (got {type(raw).__name__})"
    if source.layout == "messages":
        messages = raw.get(source.messages_field)
        if not isinstance(messages, list) or not messages:
            return None, f"field {source.messages_field!r} is missing or not a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, (f"{source.messages_field}[{i}] is not a dict with a role ({', '.join(ROLES)}) and string "
                              f"content")
    else:
        fields = [source.prompt_field, source.response_field]
        for field in fields:
            if not isinstance(raw.get(field), str):
                return None, f"field {field!r} is missing or not a string"
        messages = [{"role": "user", "content": raw[source.prompt_field]},
                    {"role": "assistant", "content": raw[source.response_field]}]
        system = raw.get(source.system_field) if source.system_field else None
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no non-empty assistant reply to learn from"
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, ""


def multiple_choice_item(rec: Record, source: MultipleChoiceSpec) -> tuple[dict | None, str]:
    """{question, choices, answer (index)} of a benchmark record, or None and why it cannot be scored."""
    if rec.problem:
        return None, rec.problem
    raw = rec.raw
    if not isinstance(raw, dict):
        return None, f"not a JSON object (got {type(raw).__name__})"
    question, choices, answer = (raw.get(source.question_field), raw.get(source.choices_field),
                                 raw.get(source.answer_field))
    if not isinstance(question, str) or not question.strip():
        return None, f"field {source.question_field!r} is missing or empty"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return None, f"field {source.choices_field!r} is not a list of at least two strings"
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return None, f"field {source.answer_field!r} is {answer!r}: not a choice index or a choice's text"
    return {"id": str(raw.get(source.id_field) or rec.origin), "question": question, "choices": choices,
            "answer": answer}, ""
