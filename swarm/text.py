"""Text in and out of a model: its Hugging Face tokenizer, or the byte-level convention of the demo.

* A model directory (or hub repo) with tokenizer files uses that tokenizer (``AutoTokenizer``) and its
  chat template when it has one.
* A model *without* tokenizer files whose vocabulary is exactly 256 tokens is read as UTF-8 bytes:
  that is how ``swarm demo`` and ``swarm train`` feed it (token = byte). Its chat prompt is the plain
  template below.
* Any other model has no way to turn text into tokens: the text paths raise ``NoTokenizer``.

The plain chat template (for models without one of their own) is one line per message,
``"{Role}: {content}\\n"`` with the role capitalised, followed by ``"Assistant:"``; generation stops
at ``"\\nUser:"``, where the model starts writing the user's next turn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from transformers import AutoTokenizer, PretrainedConfig

from core.errors import NoTokenizer

__all__ = ["TextCodec", "ByteCodec", "TokenizerCodec", "load_codec", "plain_chat_prompt", "StreamDecoder",
           "StopScanner", "PLAIN_CHAT_STOP"]

logger = logging.getLogger(__name__)

PLAIN_CHAT_STOP = "\nUser:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class TextCodec(Protocol):
    """Text <-> token ids, and a chat prompt from OpenAI-style messages."""

    eos_token_id: int | None
    chat_stop: tuple[str, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...


def plain_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The documented plain template: ``Role: content`` lines, then ``Assistant:``."""
    lines = [f"{str(m['role']).capitalize()}: {m['content']}\n" for m in messages]
    return "".join(lines) + "Assistant:"


class ByteCodec:
    """UTF-8 bytes as tokens 0..255 (the demo model's vocabulary); no end-of-sequence token."""

    eos_token_id: int | None = None
    chat_stop = (PLAIN_CHAT_STOP,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.encode(plain_chat_prompt(messages))


class TokenizerCodec:
    """A Hugging Face tokenizer; its chat template when it has one, else the plain template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.chat_stop = () if tokenizer.chat_template else (PLAIN_CHAT_STOP,)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            return self.encode(plain_chat_prompt(messages))
        ids = self.tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def load_codec(root: Path | None, config: PretrainedConfig, *, repo_id: str | None = None) -> TextCodec:
    """The model's tokenizer, the byte-level convention, or ``NoTokenizer`` saying which was missing."""
    where = repo_id or (str(root) if root is not None else None)
    has_files = root is not None and any((root / name).is_file() for name in _TOKENIZER_FILES)
    if has_files or repo_id is not None:
        try:
            return TokenizerCodec(AutoTokenizer.from_pretrained(repo_id or str(root)))
        except Exception as e:  # no files on the hub either, or a broken tokenizer: say so below
            logger.debug("no tokenizer at %s: %s", where, e)
            if has_files:
                raise NoTokenizer(f"the tokenizer of {where} cannot be loaded: {type(e).__name__}: {e}") from None
    if int(getattr(config, "vocab_size", 0)) == 256:
        return ByteCodec()
    raise NoTokenizer(f"model {where or '(unknown)'} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}) and "
                      f"its vocabulary of {config.vocab_size} is not byte-level (256): text cannot be tokenized")


class StreamDecoder:
    """Turns tokens arriving one by one into text pieces. A trailing replacement character is held
    back while it may still be an unfinished UTF-8 character (at most ``_MAX_PENDING`` tokens);
    after that it is shown as is (the bytes were not valid UTF-8)."""

    _MAX_PENDING = 3

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = 0
        self._pending = 0

    @property
    def text(self) -> str:
        return self.codec.decode(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.text
        end = len(text)
        if self._pending < self._MAX_PENDING:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        self._pending = 0 if end == len(text) else self._pending + 1
        piece, self.emitted = text[self.emitted:end], max(self.emitted, end)
        return piece

    def flush(self) -> str:
        text = self.text
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class StopScanner:
    """Finds the first stop string in growing text; ``safe`` says how much can be shown already
    (text that might be the start of a stop string is held back until it is not)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def safe(self, text: str) -> int:
        return max(0, len(text) - self._hold)
