"""The correctness anchor: local parts + a chain of stages compute what ``AutoModelForCausalLM``
computes on the same weights (logits, loss and gradients), for every family, sharded or not."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shards import (
    LocalParts,
    StageModule,
    causal_lm_loss,
    default_position_ids,
    load_local_parts,
    load_stage,
    resolve_model,
    stage_boundaries,
)

LAYERS, VOCAB, TOL = 3, 256, 1e-5

VARIANTS = {
    "gpt2": dict(family="gpt2"),
    "gpt2-untied": dict(family="gpt2", tie_embeddings=False),
    "llama-gqa": dict(family="llama", num_kv_heads=2),
    "llama-tied": dict(family="llama", tie_embeddings=True),
    "mistral": dict(family="mistral", num_kv_heads=2),
    "mistral-sliding": dict(family="mistral", sliding_window=4),
    "qwen2": dict(family="qwen2", num_kv_heads=2),
    "qwen2-sliding": dict(family="qwen2", sliding_window=4),
}


def _model(model_factory, variant: str, *, sharded: bool = False):
    return model_factory(num_layers=LAYERS, hidden_size=32, vocab_size=VOCAB, **VARIANTS[variant],
                         **({"max_shard_size": "20KB"} if sharded else {}))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def _through_stages(local: LocalParts, stages: list[StageModule], ids, mask=None, positions=None) -> torch.Tensor:
    hidden = local.embed(ids, positions)
    for stage in stages:
        hidden = stage(hidden, attention_mask=mask, position_ids=positions)
    return local.head(hidden)


def _load(model_dir, num_stages: int, attn: str = "sdpa") -> tuple[LocalParts, list[StageModule]]:
    source = resolve_model(str(model_dir))
    source.config._attn_implementation = attn
    return load_local_parts(source), [load_stage(source, r) for r in stage_boundaries(LAYERS, num_stages)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sharded, num_stages", [(False, 2), (True, 3)], ids=["single-2stages", "sharded-3stages"])
def test_logits_and_loss_equal_transformers(variant, sharded, num_stages, model_factory):
    model_dir = _model(model_factory, variant, sharded=sharded)
    assert (model_dir / "model.safetensors.index.json").exists() == sharded
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    local, stages = _load(model_dir, num_stages)
    ids, mask = _batch()
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = reference(ids, attention_mask=attention_mask, labels=ids)
            logits = _through_stages(local, stages, ids, attention_mask)
            assert _max_diff(logits, expected.logits) <= TOL
            assert abs(causal_lm_loss(logits, ids).item() - expected.loss.item()) <= TOL


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa", "mistral-sliding", "qwen2-sliding"])
def test_eager_attention_equals_transformers_eager(variant, model_factory):
    model_dir = _model(model_factory, variant)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    local, stages = _load(model_dir, 2, attn="eager")
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        assert _max_diff(_through_stages(local, stages, ids, mask), expected) <= TOL


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa", "llama-tied", "qwen2"])
def test_gradients_equal_transformers(variant, model_factory):
    model_dir = _model(model_factory, variant)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    local, stages = _load(model_dir, 2)
    ids, mask = _batch(seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    reference(ids, attention_mask=mask, labels=labels).loss.backward()
    causal_lm_loss(_through_stages(local, stages, ids, mask), labels).backward()
    theirs = dict(reference.named_parameters())
    prefix = "transformer.h." if variant == "gpt2" else "model.layers."
    for stage in stages:
        for offset, block in enumerate(stage.blocks):
            for name, param in block.named_parameters():
                other = theirs[f"{prefix}{stage.layers.start + offset}.{name}"]
                assert _max_diff(param.grad, other.grad) <= TOL, (stage.layers, name)
    embed = reference.get_input_embeddings().weight
    assert _max_diff(local.embed_tokens.weight.grad, embed.grad) <= TOL
    assert _max_diff(local.lm_head.weight.grad, reference.lm_head.weight.grad) <= TOL


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_explicit_default_positions_change_nothing(variant, model_factory):
    local, stages = _load(_model(model_factory, variant), 2)
    ids, mask = _batch()
    positions = default_position_ids(ids)
    assert positions.shape == ids.shape and positions[2].tolist() == list(range(ids.shape[1]))
    with torch.no_grad():
        implicit = _through_stages(local, stages, ids, mask)
        explicit = _through_stages(local, stages, ids, mask, positions)
    assert torch.equal(implicit, explicit)


def test_custom_positions_match_transformers(model_factory):
    """Positions that skip the padding (as some trainers pass them) are honoured like transformers does."""
    model_dir = _model(model_factory, "llama-gqa")
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    local, stages = _load(model_dir, 3)
    ids, mask = _batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
        assert _max_diff(_through_stages(local, stages, ids, mask, positions), expected) <= TOL


def test_bfloat16_stage_keeps_rotary_in_float32_and_stays_close(model_factory):
    model_dir = _model(model_factory, "llama-gqa")
    full = load_stage(str(model_dir), stage_boundaries(LAYERS, 1)[0])
    half = load_stage(str(model_dir), stage_boundaries(LAYERS, 1)[0], dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.rotary_emb.inv_freq.dtype == torch.float32
    hidden = torch.randn(2, 6, 32)
    with torch.no_grad():
        out = half(hidden.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        assert _max_diff(out.float(), full(hidden)) < 0.1


def test_tied_head_is_the_embedding_parameter(model_factory):
    tied = load_local_parts(str(_model(model_factory, "llama-tied")))
    untied = load_local_parts(str(_model(model_factory, "gpt2-untied")))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert len(list(tied.parameters())) == 2  # embedding (= head) and the RMSNorm weight
