"""Hugging Face interchange: a transformers Llama folder loads into jaxsys as the same model
(logits within 1e-4, identical greedy tokens), jaxsys exports load back into transformers and
jaxsys unchanged, and every mismatch between config.json and the weights is a clear error."""

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxsys import hf  # noqa: E402
from jaxsys.config import ModelConfig, RopeScaling  # noqa: E402
from jaxsys.generate import Generator, SamplingConfig  # noqa: E402
from jaxsys.model import ModelDef, rope_frequencies  # noqa: E402

VOCAB = 192
SEQ = 48  # longer than every original_max_position_embeddings below, so Llama-3 scaling matters
PROMPT, NEW_TOKENS = 8, 32


def llama3_rope(theta: float, original: int) -> dict:
    return {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


# name -> (LlamaConfig overrides, config.json layout handed to jaxsys; "tf5" is also saved in shards)
CASES = {
    "mha-untied-theta1e4-tf4": (dict(num_key_value_heads=4, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}), "tf4"),
    "gqa-tied-llama3-tf5": (dict(num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_parameters=llama3_rope(500_000.0, 16)), "tf5"),
    "mqa-untied-llama3-headdim32-tf4": (dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                                             rope_parameters=llama3_rope(500_000.0, 32)), "tf4-type"),
}


def to_tf4_layout(config: dict, rope_key: str = "rope_type") -> dict:
    """Rewrite a transformers-5 config.json into the transformers-4 layout (rope_theta + rope_scaling)."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {rope_key: rope_type, **rope}
    config["torch_dtype"] = config.pop("dtype")
    return config


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    """A random transformers Llama saved to a folder, and jaxsys' load of that folder."""
    overrides, layout = CASES[request.param]
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 3],
        initializer_range=0.2,  # default 0.02 makes logits so flat that greedy argmax is decided by noise
        attn_implementation="eager", **overrides)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms start at 1, which would hide a swapped norm mapping
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    sharded = layout == "tf5"  # one case reads the shards + index that transformers writes
    model.save_pretrained(folder, max_shard_size="100KB" if sharded else "50GB")
    assert (folder / hf.INDEX_FILE).is_file() == sharded
    if layout.startswith("tf4"):
        saved = json.loads((folder / "config.json").read_text())
        assert "rope_parameters" in saved  # transformers 5 wrote its own layout
        rewritten = to_tf4_layout(saved, "type" if layout == "tf4-type" else "rope_type")
        (folder / "config.json").write_text(json.dumps(rewritten))
    config, params = hf.load_hf(folder)
    return model, config, params


def test_config_matches_transformers(hf_case):
    model, config, _ = hf_case
    c = model.config
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim,
            config.resolved_head_dim) == (c.vocab_size, c.hidden_size, c.num_hidden_layers,
                                          c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
                                          c.head_dim)
    assert config.tie_embeddings == c.tie_word_embeddings
    assert (config.bos_id, config.eos_ids, config.param_dtype) == (1, (2, 3), "float32")
    # jaxsys and transformers derive the same RoPE frequencies, and where Llama-3 scaling is on it changes them.
    np.testing.assert_allclose(rope_frequencies(config), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    if config.rope_scaling is not None:
        assert not np.allclose(rope_frequencies(config), rope_frequencies(replace(config, rope_scaling=None)))


def test_logits_match_transformers(hf_case):
    model, config, params = hf_case
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    logits, _ = jax.jit(ModelDef(config).apply)(params, jnp.asarray(tokens, jnp.int32))
    diff = np.abs(np.asarray(logits) - expected).max()
    print(f"max |logit difference| vs transformers: {diff:.2e}")  # shown with pytest -s
    assert diff <= 1e-4


def test_greedy_generation_matches_transformers(hf_case):
    model, config, params = hf_case
    prompt = np.random.default_rng(2).integers(0, VOCAB, PROMPT).tolist()
    model.generation_config.eos_token_id = None  # EOS off on both sides: always 32 tokens
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    expected = out.sequences[0, PROMPT:].tolist()
    # The comparison means something only if no step is a near tie.
    top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    got = Generator(ModelDef(config), params, max_len=PROMPT + NEW_TOKENS).generate(
        prompt, max_new_tokens=NEW_TOKENS, sampling=SamplingConfig(), ignore_eos=True)
    assert got.token_ids == expected


# ------------------------------------------------------------------------------- export


def random_params(model_def: ModelDef, seed: int) -> dict:
    """Params with std 0.2 matrices and norms away from 1, so every mapping error shows in the logits."""
    rng = np.random.default_rng(seed)

    def draw(s):
        x = rng.normal(0, 0.2, s.shape) + (1 if len(s.shape) == 1 else 0)
        return jnp.asarray(x, s.dtype)
    return jax.tree.map(draw, model_def.shapes)


def tiny_config(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                       max_seq_len=128, bos_id=1, eos_ids=(2,))
    return replace(base, **changes)


EXPORTS = {
    "untied-f32-sharded": (tiny_config(), 20_000),
    "tied-bf16-llama3": (tiny_config(tie_embeddings=True, param_dtype="bfloat16", rope_theta=500_000.0,
                                     rope_scaling=RopeScaling(original_max_position_embeddings=16),
                                     eos_ids=(2, 3), tokenizer="byte"), 2**30),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_and_back(name, tmp_path):
    config, max_shard_bytes = EXPORTS[name]
    model_def = ModelDef(config)
    params = random_params(model_def, seed=3)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    folder = hf.export_hf(tmp_path / "export", config, params, tokenizer_dir=tokenizer_dir,
                          max_shard_bytes=max_shard_bytes)
    assert hf.is_hf_folder(folder) and (folder / "tokenizer.json").is_file()
    sharded = (folder / hf.INDEX_FILE).is_file()
    assert sharded == (max_shard_bytes < 2**30)
    if sharded:
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    tokens = np.random.default_rng(4).integers(0, VOCAB, (2, 40))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    logits, _ = jax.jit(model_def.apply)(params, jnp.asarray(tokens, jnp.int32))
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4

    loaded_config, loaded = hf.load_hf(folder)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_both_config_layouts_read_the_same():
    config = tiny_config(rope_theta=500_000.0, rope_scaling=RopeScaling(original_max_position_embeddings=16),
                         eos_ids=(2, 3), param_dtype="bfloat16")
    exported = hf.to_hf_config(config)
    tf5 = {k: v for k, v in exported.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    tf4 = to_tf4_layout(tf5)
    assert hf.from_hf_config(tf5) == hf.from_hf_config(tf4) == config
    # A single eos id is an int in config.json; a llama3 dict without original_max_position_embeddings
    # falls back to max_position_embeddings, as in transformers.
    del tf4["rope_scaling"]["original_max_position_embeddings"]
    loaded = hf.from_hf_config({**tf4, "eos_token_id": 7})
    assert loaded.eos_ids == (7,) and loaded.rope_scaling.original_max_position_embeddings == 128


# ------------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path):
    config = tiny_config(dim=32, ffn_dim=64)
    return hf.export_hf(tmp_path / "model", config, random_params(ModelDef(config), seed=0)), config


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_and_weights_disagree(exported):
    folder, _ = exported
    edit_config(folder, hidden_size=64)
    with pytest.raises(ValueError, match=r"config.json and the weights disagree.*model.embed_tokens.weight "
                                         r"has shape \[192, 32\], config.json implies \[192, 64\]"):
        hf.load_hf(folder)


def test_truncated_safetensors(exported):
    folder, _ = exported
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors.*corrupt or truncated"):
        hf.load_hf(folder)


def test_missing_and_extra_tensors(exported):
    folder, _ = exported
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp" not in k}, weights)
    with pytest.raises(ValueError, match=r"3 tensors .* missing .*model.layers.1.mlp.down_proj.weight"):
        hf.load_hf(folder)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}, weights)
    with pytest.raises(ValueError, match=r"no place for .*q_proj.bias"):
        hf.load_hf(folder)


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type='yarn'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     r"rope_parameters.rope_type='dynamic'"),
    ({"model_type": "mistral"}, r"model_type='mistral'"),
    ({"attention_bias": True}, r"attention_bias=True"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
])
def test_unsupported_config_is_refused(exported, changes, message):
    folder, _ = exported
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        hf.load_hf_config(folder)


def test_missing_config_json(exported):
    folder, _ = exported
    (folder / "config.json").unlink()
    assert not hf.is_hf_folder(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf(folder)


def test_export_refuses_non_empty_folder_and_never_half_writes(exported, monkeypatch):
    folder, config = exported
    params = random_params(ModelDef(config), seed=1)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.export_hf(folder, config, params)
    assert (folder / "notes.txt").read_text() == "keep me"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(hf, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        hf.export_hf(folder, config, params, overwrite=True)
    assert (folder / "notes.txt").is_file()  # the old export is intact
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # and no staging folder is left
    monkeypatch.undo()

    hf.export_hf(folder, config, params, overwrite=True)
    assert not (folder / "notes.txt").exists()
    _, loaded = hf.load_hf(folder)
    assert np.array_equal(np.asarray(loaded["embed"]), np.asarray(params["embed"]))
