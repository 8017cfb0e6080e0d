"""A tokenizer folder as training data and chat prompts use it: the project's own (trained by tasks/tokenizer.py)
or a pretrained model's (`tokenizer: {pretrained: DIR}` in a data spec).

The ids come from `tokenizer.model` through sentencepiece when the folder has one (Llama-2 and the project's own),
else from `tokenizer.json` through Hugging Face `tokenizers` (Llama-3 and most newer models). Documents are
encoded as the model was trained on them: its BOS first where its tokenizer adds one, EOS last. The chat template
is the folder's own (`chat_template.jinja` or `tokenizer_config.json`), else the project's (model/chat.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# What a tokenizer folder may hold, copied with it (a pretrained tokenizer, an export).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def identity_file(directory: Path) -> Path:
    """The file whose sha256 identifies a tokenizer folder: the one its ids come from."""
    directory = Path(directory)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} holds no tokenizer: neither tokenizer.model (sentencepiece) nor "
                            f"tokenizer.json (Hugging Face tokenizers)")


class Tokenizer:
    """Encoding, special ids and chat template of one tokenizer folder. Cheap to pickle: workers load it by path."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.file = identity_file(self.directory)
        config_path = self.directory / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._backend = None
        template = self.directory / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.is_file() else \
            self.config.get("chat_template") if isinstance(self.config.get("chat_template"), str) else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None}

    @property
    def kind(self) -> str:
        return "sentencepiece" if self.file.name == "tokenizer.model" else "tokenizers"

    @property
    def backend(self):
        if self._backend is None:
            if self.kind == "sentencepiece":
                import sentencepiece as spm

                self._backend = spm.SentencePieceProcessor(model_file=str(self.file))
            else:
                from tokenizers import Tokenizer as HFTokenizer

                self._backend = HFTokenizer.from_file(str(self.file))
        return self._backend

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.vocab_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        """The id of `text` if it is one whole token, else None."""
        if self.kind == "sentencepiece":
            i = self.backend.piece_to_id(text)
            return None if i == self.backend.unk_id() and text != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(text)

    def _special(self, name: str) -> str | None:
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def bos_token(self) -> str | None:
        if self.kind == "sentencepiece" and self._special("bos_token") is None:
            return self.backend.id_to_piece(self.backend.bos_id()) if self.backend.bos_id() >= 0 else None
        return self._special("bos_token")

    @property
    def eos_token(self) -> str:
        if self.kind == "sentencepiece" and self._special("eos_token") is None:
            return self.backend.id_to_piece(self.backend.eos_id())
        token = self._special("eos_token")
        if token is None:
            raise ValueError(f"{self.directory / 'tokenizer_config.json'}: no eos_token; documents need one to "
                             f"end with")
        return token

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def adds_bos(self) -> bool:
        """Whether the model's own tokenizer starts each text with BOS: `add_bos_token` in tokenizer_config.json
        (Llama-2 sets it), else what a `tokenizer.json` post-processor adds (Llama-3's does)."""
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"]) and self.bos_id is not None
        if self.kind == "tokenizers" and self.bos_id is not None:
            return self.backend.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        return False

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        """Token ids of each text, with no special tokens added (special tokens written in the text are kept)."""
        if self.kind == "sentencepiece":
            return self.backend.encode(texts, num_threads=threads)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_document(self, ids: list[int]) -> list[int]:
        """A document's ids as pretraining sees them: BOS first where the model's tokenizer adds it, EOS last."""
        return ([self.bos_id] if self.adds_bos else []) + list(ids) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))
