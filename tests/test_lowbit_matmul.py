"""Low-bit GEMM: the packed formats, the bit-serial definition, and the Pallas kernels.

Facts a user relies on: the bit-serial bipolar-INT product equals the plain integer
product; every kernel (interpreted on CPU) equals its pure-jnp reference, integer paths
bit for bit; quantization errors are what the formats promise; bad shapes say what is
wrong; and every kernel lowers for CUDA (Triton), so GPU lowering errors show up here.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lowbit_matmul import (
    FORMATS, BlockSizes, bitplane_matmul, dequantize, lowbit_matmul, packed_nbytes,
    quantize_activations_per_token, quantize_weight, w4a8_matmul, w4a16_matmul, w8a8_matmul)
from pallas_kernels.lowbit_matmul import formats, reference

K, N = 256, 128
SMALL_TILES = BlockSizes(block_m=16, block_n=64, block_k=64)  # 2 N tiles, 4 K tiles
SPLIT_TILES = BlockSizes(block_m=16, block_n=64, block_k=64, split_k=2)  # 2 programs per tile along K


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _int8(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, -128, 128, jnp.int32).astype(jnp.int8)


# --- formats and the bit-serial definition ---------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_bipolar_int_is_signed_int_shifted_and_planes_round_trip(bits):
    x = jnp.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))  # every signed n-bit int
    v = formats.signed_to_bipolar(x)
    assert np.all(np.asarray(v) % 2 == 1) and int(jnp.abs(v).max()) == 2**bits - 1
    np.testing.assert_array_equal(formats.bipolar_to_signed(v), x)
    u = formats.bipolar_to_offset(v, bits)  # the planes are the bits of the offset code
    powers = 2 ** jnp.arange(bits)[:, None]
    np.testing.assert_array_equal(jnp.sum((2 * formats.bit_planes(u, bits) - 1) * powers, 0), v)

    values = formats.signed_to_bipolar(jax.random.randint(
        jax.random.key(bits), (64, 8), -(2 ** (bits - 1)), 2 ** (bits - 1)))
    planes = formats.pack_bitplanes(values, bits)
    assert planes.shape == (bits, 8, 8) and planes.dtype == jnp.uint8
    weight = formats.BitplaneWeight(planes, jnp.ones((1, 8)))
    np.testing.assert_array_equal(formats.bitplane_values(weight), values)
    # Documented layout: bit j of byte r of plane i is bit i of the code at k = 8r + j.
    code = np.asarray(formats.bipolar_to_offset(values, bits))
    i, r, j, n = bits - 1, 3, 5, 2
    assert (int(planes[i, r, n]) >> j) & 1 == (code[8 * r + j, n] >> i) & 1


def test_int4_packs_two_per_byte_low_nibble_first():
    q = jax.random.randint(jax.random.key(0), (16, 4), 0, 16)
    packed = formats.pack_int4(q)
    assert packed.shape == (8, 4) and packed.dtype == jnp.uint8
    assert int(packed[3, 1]) == int(q[6, 1]) | int(q[7, 1]) << 4
    np.testing.assert_array_equal(formats.unpack_int4(packed), q)


@functools.partial(jax.jit, static_argnames=("bits",))
def _bit_serial_and_direct(x_q, signed_weights, *, bits):
    weight = formats.BitplaneWeight(
        formats.pack_bitplanes(formats.signed_to_bipolar(signed_weights), bits),
        jnp.ones((1, signed_weights.shape[1])))
    direct = x_q.astype(jnp.int32) @ formats.bitplane_values(weight)
    return reference.bitserial_int8_matmul(x_q, weight), reference.integer_matmul(x_q, weight), direct


def test_bit_serial_product_equals_integer_matmul_exactly():
    """8-bit activations x n-bit weights as 8*n XOR-popcount plane products, for n = 1..8."""
    x_q = _int8(1, (5, 200)).at[0, :3].set(-128)  # K not a multiple of the 32-bit word
    for bits in range(1, 9):
        signed = jax.random.randint(jax.random.key(bits), (200, 24), -(2 ** (bits - 1)), 2 ** (bits - 1))
        bit_serial, integer, direct = _bit_serial_and_direct(x_q, signed, bits=bits)
        np.testing.assert_array_equal(bit_serial, direct)
        np.testing.assert_array_equal(integer, direct)
    # m-bit x n-bit bipolar operands (3 x 5 bits) against the plain product of their values.
    a = formats.signed_to_bipolar(jax.random.randint(jax.random.key(3), (4, 200), -4, 4))
    b = formats.signed_to_bipolar(jax.random.randint(jax.random.key(4), (200, 6), -16, 16))
    product = reference.bitserial_bipolar_matmul(
        formats.bit_planes(formats.bipolar_to_offset(a, 3), 3),
        formats.bit_planes(formats.bipolar_to_offset(b, 5), 5))
    np.testing.assert_array_equal(product, a @ b)


def test_bit_serial_float_product_matches_dequantized_matmul():
    x = _normal(5, (3, K))
    weight = quantize_weight(_normal(6, (K, 16)), "int3", group_size=128)
    np.testing.assert_allclose(reference.bitserial_float_matmul(x, weight),
                               x @ dequantize(weight), rtol=1e-5, atol=1e-4)


# Relative Frobenius error of dequantize(quantize(w)) on Gaussian weights: upper bounds
# a little above what RTN gives (the 1-bit optimum is sqrt(1 - 2/pi) = 0.603).
ERROR_BOUNDS = {"w8a8": 0.01, "w4a16": 0.11, "w4a8": 0.12, "int1": 0.61, "int2": 0.36,
                "int3": 0.2, "int4": 0.11, "int6": 0.03, "int8": 0.008}


def test_quantization_error_on_gaussian_weights():
    w = _normal(7, (512, 256))
    errors = {}
    for name, bound in ERROR_BOUNDS.items():
        weight = quantize_weight(w, name)
        errors[name] = float(jnp.linalg.norm(dequantize(weight) - w) / jnp.linalg.norm(w))
        assert errors[name] < bound, (name, errors[name])
    bitplanes = [errors[f"int{b}"] for b in (1, 2, 3, 4, 6, 8)]
    assert bitplanes == sorted(bitplanes, reverse=True)  # more bits, less error
    assert packed_nbytes(quantize_weight(w, "int3")) < packed_nbytes(quantize_weight(w, "w4a16"))
    x = _normal(8, (4, 512))
    x_q, x_scale = quantize_activations_per_token(x)
    np.testing.assert_allclose(x_q * x_scale[:, None], x, atol=float(jnp.abs(x).max()) / 254)


def test_w4a8_stays_inside_int8_through_the_protective_range():
    weight = quantize_weight(100 * _normal(9, (512, 64)), "w4a8")
    w8 = formats.w4a8_int8_weight(weight)
    assert -127 <= int(w8.min()) and int(w8.max()) <= 127
    assert 1 <= int(weight.group_scale.min()) and int(weight.group_scale.max()) <= 16
    assert weight.group_scale.dtype == weight.group_zero.dtype == jnp.int8


def test_k_not_a_multiple_of_the_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"K=200 is not a multiple of group_size=128"):
        quantize_weight(_normal(0, (200, 16)), "w4a16")
    with pytest.raises(ValueError, match=r"K=200 is not a multiple of group_size=128"):
        quantize_weight(_normal(0, (200, 16)), "w4a8", group_size=128)


# --- kernels against references (interpret mode) ---------------------------------------------

# (format, M, dtype, quantize options, block sizes); integer paths compare exactly.
KERNEL_CASES = [
    ("w8a8", 1, jnp.bfloat16, {}, None),
    ("w8a8", 24, jnp.float32, {}, SMALL_TILES),
    ("w4a8", 1, jnp.float32, {}, None),
    ("w4a8", 16, jnp.bfloat16, {"group_size": 64}, SMALL_TILES),
    ("w4a16", 1, jnp.bfloat16, {}, None),
    ("w4a16", 8, jnp.float32, {"group_size": 32}, SMALL_TILES),
    ("int3", 1, jnp.bfloat16, {}, None),
    ("int1", 8, jnp.float32, {}, SMALL_TILES),
    ("int8", 16, jnp.bfloat16, {"group_size": 128}, SMALL_TILES),
    ("int8a8", 8, jnp.float32, {}, SMALL_TILES),
    ("int2a8", 1, jnp.float32, {"group_size": 128}, None),
    ("w8a8", 1, jnp.float32, {}, SPLIT_TILES),
    ("w4a8", 3, jnp.float32, {"group_size": 64}, SPLIT_TILES),
    ("w4a16", 1, jnp.float32, {"group_size": 32}, SPLIT_TILES),
]


def _run(name, x, weight, impl, blocks):
    """Kernel or reference for a registered format, on activations x (float)."""
    fmt = FORMATS[name]
    if fmt.activation_bits == 8:
        x_q, x_scale = quantize_activations_per_token(x)
        args, kw = (x_q, x_scale, weight), {"out_dtype": x.dtype}
    else:
        args, kw = (x, weight), {}
    if impl == "reference":
        return fmt.reference(*args, **kw)
    return fmt.kernel(*args, block_sizes=blocks, interpret=True, **kw)


@pytest.mark.parametrize("name,M,dtype,opts,blocks", KERNEL_CASES,
                         ids=[f"{c[0]}-M{c[1]}-{jnp.dtype(c[2]).name}{'-splitk' if c[4] and c[4].split_k > 1 else ''}"
                              for c in KERNEL_CASES])
def test_kernel_matches_reference(name, M, dtype, opts, blocks):
    seed = zlib.crc32(f"{name}-{M}".encode()) % 1000
    weight = quantize_weight(_normal(seed, (K, N)), name, **opts)
    x = _normal(seed + 1, (M, K), dtype)
    got = _run(name, x, weight, "pallas", blocks)
    want = _run(name, x, weight, "reference", blocks)
    assert got.shape == (M, N) and got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    grouped_int8 = name.endswith("a8") and name.startswith("int") and opts
    split = blocks is not None and blocks.split_k > 1  # float partials, summed: not bit for bit
    if FORMATS[name].activation_bits == 8 and not grouped_int8 and not split:
        np.testing.assert_array_equal(got, want)  # int32 accumulation, same epilogue
    else:  # float accumulation order (and per-group float sums) differ
        scale = float(np.abs(want).max())
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def test_bad_shapes_say_what_is_wrong():
    x_q, x_scale = _int8(0, (4, K)), jnp.ones((4,))
    weight = quantize_weight(_normal(0, (K, N)), "w8a8")
    with pytest.raises(ValueError, match=r"block_k=512 must divide K=256"):
        w8a8_matmul(x_q, x_scale, weight, block_sizes=BlockSizes(block_k=512))
    with pytest.raises(ValueError, match=r"block_n=96 must be a power of two"):
        w8a8_matmul(x_q, x_scale, weight, block_sizes=BlockSizes(block_n=96))
    with pytest.raises(ValueError, match=r"split_k=3 must be >= 1 and divide the 4 K tiles"):
        w8a8_matmul(x_q, x_scale, weight, block_sizes=BlockSizes(block_k=64, split_k=3))
    with pytest.raises(ValueError, match=r"x_q has K=128 but the weight has K=256"):
        w8a8_matmul(x_q[:, :128], x_scale, weight)
    with pytest.raises(ValueError, match=r"x_q must be one of \['int8'\]"):
        w8a8_matmul(x_q.astype(jnp.float32), x_scale, weight)
    grouped = quantize_weight(_normal(0, (K, N)), "int4", group_size=64)
    with pytest.raises(ValueError, match=r"block_k=128 must divide group_size=64"):
        bitplane_matmul(_normal(0, (4, K)), grouped, block_sizes=BlockSizes(block_k=128))
    with pytest.raises(ValueError, match=r"bit-plane kernels do not split K"):
        bitplane_matmul(_normal(0, (4, K)), grouped, block_sizes=BlockSizes(block_k=64, split_k=2))
    with pytest.raises(ValueError, match=r"unknown low-bit format 'w3a3'"):
        lowbit_matmul(_normal(0, (4, K)), weight, format="w3a3")
    with pytest.raises(TypeError, match=r"format 'w4a16' needs a W4A16Weight"):
        lowbit_matmul(_normal(0, (4, K)), weight, format="w4a16")


# --- the API ---------------------------------------------------------------------------------


def test_lowbit_matmul_approximates_the_float_product_in_each_kind_of_format():
    w, x = _normal(10, (K, 64)), _normal(11, (2, 3, K))  # leading dims are kept

    @functools.partial(jax.jit, static_argnames="name")
    def products(x, w, name):
        weight = quantize_weight(w, name)
        y = lowbit_matmul(x, weight, format=name, impl="reference")
        return y, x @ dequantize(weight)

    exact = x @ w
    assert set(FORMATS) == {"w8a8", "w4a16", "w4a8", *(f"int{b}{a}" for b in range(1, 9) for a in ("", "a8"))}
    for name in ("w8a8", "w4a16", "w4a8", "int1", "int3", "int8", "int2a8"):
        fmt = FORMATS[name]
        y, y_dequantized = products(x, w, name)
        assert y.shape == (2, 3, 64) and y.dtype == x.dtype
        # Against the dequantized product, only activation rounding (A8) remains.
        rel = float(jnp.linalg.norm(y - y_dequantized) / jnp.linalg.norm(y_dequantized))
        assert rel < (0.02 if fmt.activation_bits == 8 else 1e-5), (name, rel)
        if fmt.weight_bits >= 8:
            assert float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact)) < 0.03, name


def test_auto_impl_falls_back_to_reference_on_cpu_and_pallas_agrees_under_jit():
    weight = quantize_weight(_normal(12, (K, N)), "w4a8")
    x = _normal(13, (3, K), jnp.bfloat16)
    auto = lowbit_matmul(x, weight)
    np.testing.assert_array_equal(auto, lowbit_matmul(x, weight, impl="reference"))
    pallas = jax.jit(functools.partial(lowbit_matmul, impl="pallas"))(x, weight)
    np.testing.assert_array_equal(pallas, auto)


# --- lowering for CUDA -----------------------------------------------------------------------

EXPORT_CASES = {
    "w8a8": (w8a8_matmul, "int8", "w8a8", {}),
    "w4a8": (w4a8_matmul, "int8", "w4a8", {}),
    "w4a16": (w4a16_matmul, "bf16", "w4a16", {}),
    "bitplane-bf16": (bitplane_matmul, "bf16", "int3", {}),
    "bitplane-int8": (bitplane_matmul, "int8", "int8", {"group_size": 128}),
    "w4a16-splitk": (w4a16_matmul, "bf16", "w4a16", {}, BlockSizes(block_n=64, block_k=128, split_k=2)),
    "w4a8-splitk": (w4a8_matmul, "int8", "w4a8", {}, BlockSizes(block_n=64, block_k=128, split_k=4)),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
@pytest.mark.parametrize("M", [1, 256])
def test_kernel_lowers_for_cuda(case, M):
    kernel, activations, name, opts, *blocks = EXPORT_CASES[case]
    weight = jax.eval_shape(functools.partial(quantize_weight, format=name, **opts),
                            jax.ShapeDtypeStruct((512, 256), jnp.float32))
    S = jax.ShapeDtypeStruct
    if activations == "int8":
        x, x_scale = S((M, 512), jnp.int8), S((M,), jnp.float32)
        args = (x, weight, x_scale) if kernel is bitplane_matmul else (x, x_scale, weight)
    else:
        args = (S((M, 512), jnp.bfloat16), weight)
    exported = jax.export.export(
        jax.jit(functools.partial(kernel, interpret=False, block_sizes=blocks[0] if blocks else None)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()
