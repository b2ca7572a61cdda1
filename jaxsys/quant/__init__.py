"""Weight quantization of Llama models into the low-bit formats of `pallas_kernels.lowbit_matmul`.

Every linear layer of the transformer blocks (q, k, v, o, gate, up, down) is quantized
into any registered format (w8a8, w4a16, w4a8, int1..int8, int1a8..int8a8) and runs
through the model's own code: `jaxsys.model.project` sees a `QuantizedWeight` and calls
`lowbit_matmul` (the Pallas kernel on a GPU, the pure-jnp reference elsewhere), which
quantizes activations per token to int8 for the A8 formats.

Methods: round-to-nearest (`rtn`), and activation-aware scaling from a small calibration
batch (`awq-like`): SmoothQuant's migration for int8-activation formats, AWQ's scale
search for weight-only ones, folded into the float model before rounding (the paper
details and the folding are in `smoothing`). Unlike QServe we keep the KV cache and the
attention in float here (KV quantization is `jaxsys.kvcache`'s business), and unlike
AWQ's release we do not search clipping separately.

The embedding and lm_head stay in float, as in AWQ, SmoothQuant and QServe. The
embedding is a row gather, not a GEMM: a decode step reads one row per token, so its
bytes do not bound decoding and no kernel would run on it. lm_head is a GEMM, but the
most sensitive one: its errors land directly on the logits, with no residual stream or
norm to absorb them, and in multi-billion-parameter models it is a few percent of the
weights. (With tied embeddings the two are one table, which settles it.) RMSNorm weights
stay float too, and absorb the activation-aware scales.

    qparams = quantize_model(config, params, "w4a8", method="awq-like", calib_tokens=tokens)
    logits, _ = ModelDef(config).apply(qparams, tokens)
    save_quantized("runs/small-w4a8", config, qparams)   # `jaxsys quantize`
    config, qparams, tokenizer = load_quantized("runs/small-w4a8")

Importing this package does not import JAX (the CLI parses arguments first); the names
below load their module on first use.
"""

_NAMES = {
    "QuantizedWeight": "weights", "LINEAR_LAYERS": "weights", "quantize_linear": "weights",
    "quantize_params": "weights", "check_group_size": "weights", "default_group_size": "weights",
    "quantized_format": "weights", "nbytes": "weights", "is_quantized": "weights",
    "InputStats": "calibration", "collect_input_stats": "calibration", "calibration_tokens": "calibration",
    "GroupScale": "smoothing", "smooth_params": "smoothing", "search_scale": "smoothing",
    "scale_family": "smoothing",
    "METHODS": "quantize", "quantize_model": "quantize", "quantize_for_generate": "quantize",
    "save_quantized": "checkpoint", "load_quantized": "checkpoint", "load_quantized_params": "checkpoint",
    "is_quantized_checkpoint": "checkpoint", "QuantizedCheckpointError": "checkpoint",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib
        return getattr(importlib.import_module(f"jaxsys.quant.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'jaxsys.quant' has no attribute {name!r}")
