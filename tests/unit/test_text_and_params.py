"""Text codecs (tokenizer, byte-level convention, none), streaming decode, stop strings, and how
``generate``'s arguments resolve against the model's generation config."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig, GPT2Config

from core.errors import ConfigError, NoTokenizer
from trainer.generation import GenerationParams, resolve_params
from swarm.text import PLAIN_CHAT_STOP, ByteCodec, StopScanner, StreamDecoder, load_codec, plain_chat_prompt


def test_byte_level_convention_and_missing_tokenizer(tmp_path):
    codec = load_codec(tmp_path, GPT2Config(vocab_size=256))
    assert isinstance(codec, ByteCodec)
    assert codec.decode(codec.encode("héllo ✓")) == "héllo ✓"
    assert codec.chat_prompt([{"role": "user", "content": "hi"}]) == list(b"User: hi\nAssistant:")
    with pytest.raises(NoTokenizer, match="no tokenizer files .* vocabulary of 50257 is not byte-level"):
        load_codec(tmp_path, GPT2Config(vocab_size=50257))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NoTokenizer, match="cannot be loaded"):
        load_codec(tmp_path, GPT2Config(vocab_size=256))


def test_plain_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain_chat_prompt(messages) == "System: Be brief.\nUser: Hi\nAssistant:"


def test_stream_decoder_holds_back_only_unfinished_characters():
    decoder = StreamDecoder(ByteCodec())
    pieces = [decoder.push(b) for b in "a✓".encode()]  # ✓ is 3 bytes: shown once complete
    assert pieces == ["a", "", "", "✓"]
    invalid = [decoder.push(0xFF) for _ in range(5)]  # never valid UTF-8: shown after 3 tokens
    assert "".join(invalid) + decoder.flush() == "\ufffd" * 5 and invalid[:3] == ["", "", ""]


@pytest.mark.parametrize(
    "stops, text, found, safe",
    [
        ([], "hello", None, 5),
        (["\nUser:"], "hi\nUs", None, 0),
        (["\nUser:"], "hi there\nUser: more", 8, 14),
        (["x", "lo"], "hello", 3, 4),
        ([PLAIN_CHAT_STOP, ""], "abc", None, 0),
    ],
)
def test_stop_scanner(stops, text, found, safe):
    scanner = StopScanner(stops)
    assert scanner.find(text) == found and scanner.safe(text) == safe


@pytest.mark.parametrize(
    "defaults, kwargs, expected",
    [
        (GenerationConfig(eos_token_id=5), {}, GenerationParams(eos_token_id=(5,), pad_token_id=5)),
        (GenerationConfig(eos_token_id=[5, 6], pad_token_id=0), {"max_new_tokens": 3},
         GenerationParams(max_new_tokens=3, eos_token_id=(5, 6), pad_token_id=0)),
        (GenerationConfig(eos_token_id=5), {"eos_token_id": []}, GenerationParams()),
        (GenerationConfig(), {"do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.9},
         GenerationParams(do_sample=True, temperature=0.5, top_k=0, top_p=0.9)),
    ],
)
def test_resolve_params(defaults, kwargs, expected):
    assert resolve_params(defaults, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_beams": 4}, "does not support num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_resolve_params_refuses_by_name(kwargs, message):
    with pytest.raises(ConfigError) as raised:
        resolve_params(GenerationConfig(), **kwargs)
    assert message in str(raised.value)


def test_warpers_follow_transformers_order():
    names = [type(w).__name__ for w in GenerationParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.8).warpers()]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert len(GenerationParams(do_sample=False, temperature=0.7).warpers()) == 0
