"""Quantized models (`jaxsys.quant`): what serving a low-bit model relies on."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import get_preset
from jaxsys.data import load_tokenizer
from jaxsys.generate import Generator
from jaxsys.model import ModelDef
from jaxsys.quant import (
    InputStats, QuantizedWeight, load_quantized, nbytes, quantize_model, quantize_params, smooth_params)
from jaxsys.quant import cli as quant_cli
from jaxsys.quant.calibration import calibration_tokens
from jaxsys.quant.smoothing import fold_scales, scaled_error, search_scale
from jaxsys.quant.weights import cast_embeddings

TINY = get_preset("tiny")  # dim 64, 4 heads / 2 kv heads, ffn 128
GROUP = 32
# Relative L2 error of the logits of a random-init tiny model, by weight bits.
TOLERANCE = {"w8a8": 0.03, "int4a8": 0.2, "w4a16": 0.2, "w4a8": 0.2, "int3": 0.4, "int2": 0.7}


@pytest.fixture(scope="module")
def tiny():
    model = ModelDef(TINY)
    params = model.init(0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 24)), jnp.int32)
    apply = jax.jit(model.apply)
    return model, params, tokens, apply, apply(params, tokens)[0]


@pytest.fixture(scope="module")
def quantized(tiny):
    _, params, *_ = tiny
    cache = {}

    def get(fmt):
        if fmt not in cache:
            cache[fmt] = quantize_params(TINY, params, fmt, group_size=GROUP)
        return cache[fmt]

    return get


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_every_format_runs_the_model_close_to_float_by_bits(tiny, quantized):
    _, _, tokens, apply, ref = tiny
    errors = {fmt: relative_error(apply(quantized(fmt), tokens)[0], ref) for fmt in TOLERANCE}
    for fmt, limit in TOLERANCE.items():
        assert errors[fmt] < limit, (fmt, errors)
    assert errors["w8a8"] < errors["w4a8"] < errors["int3"] < errors["int2"], errors


def test_weight_only_model_is_the_float_model_with_dequantized_weights(tiny, quantized):
    # Catches any mix-up of the [dim, heads, head_dim] / [heads, head_dim, dim] reshapes.
    _, _, tokens, apply, _ = tiny
    for fmt in ("w4a16", "int3"):
        qparams = quantized(fmt)
        dequantized = jax.tree.map(lambda w: w.dequantize() if isinstance(w, QuantizedWeight) else w,
                                   qparams, is_leaf=lambda w: isinstance(w, QuantizedWeight))
        np.testing.assert_allclose(apply(qparams, tokens)[0], apply(dequantized, tokens)[0], atol=2e-5)


def test_generator_decodes_a_quantized_model_as_its_full_forward(tiny, quantized):
    model, _, _, apply, _ = tiny
    qparams = quantized("w4a8")  # int8 activations: per-token, so cached decode changes nothing
    prompt = [257, 72, 105, 33, 10]
    out = Generator(model, qparams, max_len=16).generate(prompt, max_new_tokens=5, ignore_eos=True)
    sequence = jnp.asarray([prompt + out.token_ids[:-1]], jnp.int32)
    logits, _ = apply(qparams, sequence)
    assert out.token_ids == jnp.argmax(logits[0, len(prompt) - 1:], axis=-1).tolist()


def test_folded_scales_leave_the_float_function_unchanged(tiny):
    _, params, tokens, apply, ref = tiny
    rng = np.random.default_rng(1)
    k = {"o": TINY.dim, "down": TINY.ffn_dim, "qkv": TINY.dim, "gate_up": TINY.dim}
    scales = [{g: np.exp(rng.normal(0, 1.5, n)).astype(np.float32) for g, n in k.items()}
              for _ in range(TINY.n_layers)]  # spread over ~100x, o's untied across kv groups
    folded = fold_scales(TINY, params, scales)
    assert not np.allclose(folded["layers"][0]["attn"]["q"], params["layers"][0]["attn"]["q"])
    out = apply(folded, tokens)[0]
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6


def test_activation_aware_search_keeps_the_function_and_never_loses_to_rtn(tiny):
    _, params, tokens, apply, ref = tiny
    calib = calibration_tokens(load_tokenizer("byte"), batches=1, seq_len=64)
    smoothed, report = smooth_params(TINY, params, calib, "w8a8", group_size=GROUP)
    assert len(report) == 4 * TINY.n_layers
    assert all(r.error <= r.rtn_error for r in report)
    assert any(r.alpha is not None for r in report)
    out = apply(smoothed, tokens)[0]
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6


@pytest.mark.parametrize("fmt, gain", [("w8a8", 0.5), ("w4a16", 1.0)])
def test_activation_aware_beats_rtn_on_a_layer_with_outlier_channels(fmt, gain):
    # SmoothQuant's and AWQ's setting: a few input channels 40x larger than the rest.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 128)).astype(np.float32)
    x[:, [3, 17, 90]] *= 40
    w = jnp.asarray(rng.normal(0, 0.05, (128, 96)), jnp.float32)
    calib, fresh = x[:1024], jnp.asarray(x[1024:])
    stats = InputStats(np.abs(calib).max(0), np.abs(calib).mean(0), calib)
    s, alpha, error, rtn_error = search_scale(stats, w, fmt, group_size=GROUP)
    assert alpha is not None and error < rtn_error
    target = jnp.dot(fresh, w, precision="highest")
    held_out = lambda scale: float(scaled_error(fresh, w, target, jnp.asarray(scale), format=fmt,  # noqa: E731
                                                group_size=GROUP))
    assert held_out(s) <= gain * held_out(np.ones(128, np.float32)), (held_out(s), held_out(np.ones(128)))


def test_quantize_cli_writes_a_checkpoint_that_loads_to_the_same_model(tiny, quantized, tmp_path, capsys):
    _, _, tokens, apply, _ = tiny
    out = tmp_path / "tiny-w4a16"
    argv = ["quantize", "--model", "tiny", "--format", "w4a16", "--out", str(out), "--group-size", str(GROUP),
            "--json"]
    assert quant_cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert quant_cli.is_quantized_checkpoint(out)
    config, qparams, tokenizer = load_quantized(out)
    assert config == TINY and tokenizer.name == "byte"
    # `--model tiny` quantizes the seed-0 weights, and stores embedding and lm_head in bf16.
    expected = cast_embeddings(quantized("w4a16"), "bfloat16")
    np.testing.assert_array_equal(apply(qparams, tokens)[0], apply(expected, tokens)[0])

    # Size: 4 bits per weight plus a float32 scale and zero per group of 32, against bf16.
    sizes = nbytes(qparams)
    assert summary["linear_ratio_vs_bf16"] == pytest.approx((4 + 2 * 32 / GROUP) / 16)
    assert sizes["quantized"] / sizes["quantized_bf16"] == pytest.approx(summary["linear_ratio_vs_bf16"])
    assert sizes["total"] <= summary["file_bytes"] <= sizes["total"] + 64 * 1024  # + the header

    assert quant_cli.main(argv) == 1  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_low_bit_checkpoint_is_about_bits_over_16_of_bf16(tiny):
    # Sizes follow from shapes alone: no need to run anything.
    _, params, *_ = tiny
    for fmt, bits in (("w8a8", 8), ("int2", 2)):
        sizes = nbytes(jax.eval_shape(lambda p: quantize_params(TINY, p, fmt, group_size=64), params))
        ratio = sizes["quantized"] / sizes["quantized_bf16"]
        assert bits / 16 < ratio < bits / 16 + 0.07, (fmt, ratio)


def test_errors_say_what_to_do(tiny, tmp_path):
    _, params, *_ = tiny
    with pytest.raises(ValueError, match="unknown low-bit format 'w3a3'.*w8a8, w4a16, w4a8, int1"):
        quantize_params(TINY, params, "w3a3")
    with pytest.raises(ValueError, match=r"group_size=48 does not divide .*K=64.*K=128"):
        quantize_params(TINY, params, "w4a16", group_size=48)
    with pytest.raises(ValueError, match="group_size=128 does not divide"):
        quantize_params(TINY, params, "int4")  # the default group size, on tiny's K=64
    with pytest.raises(ValueError, match="calibration tokens"):
        quantize_model(TINY, params, "w8a8", method="awq-like")
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_model(TINY, params, "w8a8", method="gptq")
    with pytest.raises(ValueError, match="is missing or corrupt"):
        load_quantized(tmp_path)
    assert not quant_cli.is_quantized_checkpoint(tmp_path)
