"""Small Hugging Face Llama folders built offline, as a user's download would look: random weights saved by
`transformers` itself in several safetensors shards, with a tokenizer trained on real text.

- `llama2_like`: multi-head attention, a sentencepiece `tokenizer.model` that adds BOS (as Llama-2's), no chat
  template, and a vocabulary of 1000 (not a multiple of 128: Megatron pads it). Its embeddings are tied, as in
  SmolLM or TinyLlama-style small models, so the tied path is covered too.
- `llama3_like`: grouped-query attention 4:1, rope_theta 500000, untied embeddings, a `tokenizer.json` (byte-level
  BPE through `tokenizers`) whose post-processor adds <|begin_of_text|>, and Llama-3's chat template.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def save_model(out: Path, seed: int, **config) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(out, max_shard_size="200KB")  # several shards and model.safetensors.index.json


def llama2_like(out: Path, lines: list[str]) -> Path:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}))
    save_model(out, 1, vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2)
    return out


def llama3_like(out: Path, lines: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1000, special_tokens=LLAMA3_SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    save_model(out, 2, vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=bos,
               eos_token_id=tok.token_to_id("<|end_of_text|>"))
    return out


if __name__ == "__main__":  # python tests/hf_models.py llama2|llama3 OUT_DIR: a folder to try the HF flows on
    import gzip
    import sys

    bundled = Path(__file__).resolve().parents[1] / "data" / "bundled" / "sotu.jsonl.gz"
    with gzip.open(bundled, "rt", encoding="utf-8") as f:
        text = [line for doc in map(json.loads, f) for line in doc["text"].split("\n") if line.strip()]
    builders = {"llama2": llama2_like, "llama3": llama3_like}
    print(builders[sys.argv[1]](Path(sys.argv[2]), text[:20_000]))
