"""Loading reads only what a stage (or the trainer) needs, and refuses bad models with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shards.source
from shards import Family, LayerRange, family_of, load_local_parts, load_stage, num_layers, resolve_model
from shards.families import SUPPORTED_FAMILIES
from core.errors import ModelLoadError, UnsupportedArchitecture


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """File names that ``shards.source`` really opens with ``safe_open`` during the test."""
    seen: set[str] = set()

    def recording(path, *args, **kwargs):
        seen.add(Path(path).name)
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(shards.source, "safe_open", recording)
    return seen


def _reshard_by_layer(model_dir: Path, out: Path) -> Path:
    """Rewrite a checkpoint as one file per layer plus ``rest.safetensors``, with an index."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = load_file(model_dir / "model.safetensors")
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer = _family_of_dir(model_dir).layer_of(name)
        files.setdefault(f"layer-{layer[0]}.safetensors" if layer else "rest.safetensors", {})[name] = tensor
    for filename, part in files.items():
        save_file(part, out / filename, metadata={"format": "pt"})
    weight_map = {name: filename for filename, part in files.items() for name in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _family_of_dir(model_dir: Path) -> Family:
    return family_of(resolve_model(str(model_dir)).config)


def _layer_names(source, family: Family, layers: LayerRange) -> set[str]:
    return {n for n in source.tensor_names() if (found := family.layer_of(n)) is not None and found[0] in layers}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("sharded", [False, True])
def test_a_stage_reads_only_its_own_tensors(family, sharded, model_factory, opened):
    model_dir = model_factory(family, num_layers=4, hidden_size=32,
                              **({"max_shard_size": "20KB"} if sharded else {}))
    source = resolve_model(str(model_dir))
    layers = LayerRange(start=1, end=3)
    stage = load_stage(source, layers)
    assert source.loaded_names == _layer_names(source, stage.family, layers)
    keys = {key.split(".")[1] for key in stage.state_dict()}
    assert all(key.startswith("blocks.") for key in stage.state_dict()) and keys == {"0", "1"}
    assert len(stage.state_dict()) == len(source.loaded_names)
    if sharded:
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
        assert opened == source.opened_files == {index[name] for name in source.loaded_names}
        assert len(set(index.values())) > len(opened)


def test_a_stage_in_one_shard_file_opens_only_that_file(model_factory, tmp_path, opened):
    model_dir = _reshard_by_layer(model_factory("llama", num_layers=4, hidden_size=32), tmp_path / "by-layer")
    source = resolve_model(str(model_dir))
    load_stage(source, LayerRange(start=2, end=3))
    assert opened == source.opened_files == {"layer-2.safetensors"}
    assert source.loaded_names and all(name.startswith("model.layers.2.") for name in source.loaded_names)


@pytest.mark.parametrize("family, tie", [("gpt2", None), ("gpt2", False), ("llama", False), ("llama", True)])
def test_local_parts_read_only_embeddings_norm_and_head(family, tie, model_factory, opened):
    source = resolve_model(str(model_factory(family, num_layers=2, hidden_size=32, tie_embeddings=tie)))
    parts = load_local_parts(source)
    fam = parts.family
    assert not any(fam.layer_of(name) for name in source.loaded_names)
    assert ("lm_head.weight" in source.loaded_names) == (not parts.tied)
    assert len(source.loaded_names) == len(list(parts.parameters()))
    assert not any(p.is_meta for p in parts.parameters())


def test_hub_style_gpt2_names_load_and_stale_buffers_are_skipped(model_factory, tmp_path):
    """The hub's gpt2 checkpoint has ``h.0.attn.c_attn.weight`` (no ``transformer.``) and old
    ``attn.bias`` mask buffers that today's blocks do not have: those must be left unread."""
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    renamed = tmp_path / "gpt2-hub-style"
    shutil.copytree(model_dir, renamed)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(renamed / "model.safetensors").items()}
    tensors |= {f"h.{i}.attn.bias": torch.ones(1, 1, 8, 8) for i in range(2)}
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 256, (2, 6))
    outputs = []
    for directory in (model_dir, renamed):
        source = resolve_model(str(directory))
        local, stage = load_local_parts(source), load_stage(source, LayerRange(start=0, end=2))
        with torch.no_grad():
            outputs.append(local.head(stage(local.embed(ids))))
    assert torch.equal(*outputs)
    assert not {"h.0.attn.bias", "h.1.attn.bias"} & source.loaded_names


def test_loaded_parameters_are_the_checkpoint_values(model_factory):
    model_dir = model_factory("qwen2", num_layers=2, hidden_size=32)
    stage = load_stage(str(model_dir), LayerRange(start=1, end=2))
    tensors = load_file(model_dir / "model.safetensors")
    for name, value in stage.blocks[0].state_dict().items():
        assert torch.equal(value, tensors[f"model.layers.1.{name}"]), name


def test_non_persistent_buffers_are_materialised(model_factory, monkeypatch):
    """A block with a buffer no checkpoint holds (as rotary or mask buffers once were) gets a real one."""
    original = Family.build_block

    def with_buffer(self, config, index):
        block = original(self, config, index)
        block.register_buffer("scale", torch.full((3,), 2.0), persistent=False)
        return block

    monkeypatch.setattr(Family, "build_block", with_buffer)
    stage = load_stage(str(model_factory("llama", num_layers=2, hidden_size=32)), LayerRange(start=0, end=2))
    assert all(torch.equal(block.scale, torch.full((3,), 2.0)) for block in stage.blocks)


def _edited_config(model_dir: Path, tmp_path: Path, **edit) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text()) | edit
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, ["'bert'", "BertForMaskedLM"]),
        ({"model_type": "frobnicator", "architectures": ["FrobForCausalLM"]}, ["'frobnicator'", "FrobForCausalLM"]),
        ({"model_type": "t5", "architectures": None}, ["'t5'", "no architectures listed"]),
    ],
    ids=["known-to-transformers", "made-up", "no-architectures"],
)
@pytest.mark.parametrize("loader", ["stage", "local"])
def test_unsupported_architecture_names_it_and_the_supported_ones(edit, words, loader, model_factory, tmp_path):
    model_dir = _edited_config(model_factory("gpt2", num_layers=2, hidden_size=32), tmp_path, **edit)
    with pytest.raises(UnsupportedArchitecture) as caught:
        if loader == "stage":
            load_stage(str(model_dir), LayerRange(start=0, end=1))
        else:
            load_local_parts(str(model_dir))
    message = str(caught.value)
    assert "\n" not in message
    for word in [*words, *SUPPORTED_FAMILIES]:
        assert word in message


@pytest.mark.parametrize("layers, total", [((1, 5), 2), ((2, 3), 2), ((0, 3), 2)])
def test_layers_beyond_the_model_are_refused(layers, total, model_factory):
    model_dir = model_factory("gpt2", num_layers=total, hidden_size=32)
    start, end = layers
    with pytest.raises(ModelLoadError, match=rf"layers \[{start}, {end}\) are outside .* {total} layers"):
        load_stage(str(model_dir), LayerRange(start=start, end=end))


def _llama_without(tensor: str, model_factory, tmp_path) -> Path:
    """A copy of a tiny Llama whose checkpoint lacks ``tensor``."""
    model_dir = tmp_path / "broken"
    shutil.copytree(model_factory("llama", num_layers=2, hidden_size=32), model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors[tensor]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def test_missing_layer_tensor_is_a_clear_error(model_factory, tmp_path):
    model_dir = _llama_without("model.layers.1.mlp.up_proj.weight", model_factory, tmp_path)
    load_stage(str(model_dir), LayerRange(start=0, end=1))
    with pytest.raises(ModelLoadError, match=r"layer 1 lacks tensors \['mlp.up_proj.weight'\]"):
        load_stage(str(model_dir), LayerRange(start=1, end=2))


def test_missing_head_is_a_clear_error(model_factory, tmp_path):
    model_dir = _llama_without("lm_head.weight", model_factory, tmp_path)
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_local_parts(str(model_dir))


@pytest.mark.parametrize(
    "config, expected",
    [({"model_type": "gpt2", "n_layer": 5}, 5), ({"model_type": "llama", "num_hidden_layers": 7}, 7)],
)
def test_num_layers(config, expected):
    from transformers import AutoConfig

    assert num_layers(AutoConfig.for_model(**config)) == expected


@pytest.mark.parametrize(
    "family, name, expected",
    [
        ("gpt2", "transformer.h.3.attn.c_attn.weight", (3, "attn.c_attn.weight")),
        ("gpt2", "h.12.mlp.c_fc.bias", (12, "mlp.c_fc.bias")),
        ("gpt2", "transformer.wte.weight", None),
        ("gpt2", "lm_head.weight", None),
        ("llama", "model.layers.0.self_attn.q_proj.weight", (0, "self_attn.q_proj.weight")),
        ("llama", "model.layers.10.input_layernorm.weight", (10, "input_layernorm.weight")),
        ("llama", "model.norm.weight", None),
        ("llama", "model.layers.x.weight", None),
    ],
)
def test_layer_of_checkpoint_names(family, name, expected):
    from shards import FAMILIES

    assert FAMILIES[family].layer_of(name) == expected
    if expected is not None:
        assert FAMILIES[family].canonical(name).startswith(FAMILIES[family].layer_tensor_prefix(expected[0]))
