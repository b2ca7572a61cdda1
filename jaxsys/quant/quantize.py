"""Quantize a model: round-to-nearest, or activation-aware scaling then round-to-nearest."""

from __future__ import annotations

import logging

import numpy as np

from jaxsys.config import ModelConfig
from jaxsys.quant.calibration import calibration_tokens
from jaxsys.quant.smoothing import smooth_params
from jaxsys.quant.weights import (
    PREFERRED_GROUP_SIZE, check_group_size, default_group_size, quantize_params)

METHODS = ("rtn", "awq-like")
DEFAULT_CALIB_BATCHES = 4
log = logging.getLogger("jaxsys.quant")


def quantize_model(config: ModelConfig, params: dict, format: str, *, method: str = "rtn",
                   calib_tokens: np.ndarray | None = None,
                   group_size: int | None = PREFERRED_GROUP_SIZE) -> dict:
    """The params with every linear layer of the blocks in `format`.

    method "rtn" rounds each weight to the nearest level; "awq-like" first folds
    activation-aware scales from `calib_tokens` [sequences, seq_len] into the float model
    (SmoothQuant for int8-activation formats, AWQ for weight-only ones; see
    `jaxsys.quant.smoothing`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    check_group_size(config, format, group_size)
    if method == "awq-like":
        if calib_tokens is None:
            raise ValueError("method 'awq-like' needs calibration tokens (calib_tokens=[sequences, seq_len])")
        params, report = smooth_params(config, params, calib_tokens, format, group_size=group_size)
        kept = sum(r.alpha is None for r in report)
        log.info("activation-aware scales: %d of %d layer groups rescaled; summed output error %.3g (RTN) -> %.3g",
                 len(report) - kept, len(report), sum(r.rtn_error for r in report),
                 sum(r.error for r in report))
    return quantize_params(config, params, format, group_size=group_size)


def resolve_group_size(config: ModelConfig, group_size: int | None | str) -> int | None:
    """"auto": 128 where it divides every layer's K, else the largest power of two that does."""
    return default_group_size(config) if group_size == "auto" else group_size


def quantize_for_generate(config: ModelConfig, params: dict, format: str, *, method: str = "rtn",
                          tokenizer=None, calib_batches: int = DEFAULT_CALIB_BATCHES,
                          group_size: int | None | str = "auto") -> dict:
    """`jaxsys generate --weights FORMAT`: quantized params for `Generator(ModelDef(config), ...)`."""
    group_size = resolve_group_size(config, group_size)
    tokens = None
    if method == "awq-like":
        tokens = calibration_tokens(tokenizer, batches=calib_batches)
    qparams = quantize_model(config, params, format, method=method, calib_tokens=tokens, group_size=group_size)
    log.info("quantized the linear layers to %s (%s, group size %s)", format, method, group_size)
    return qparams
