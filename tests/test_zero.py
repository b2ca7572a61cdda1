"""Explicit ZeRO schedules: same numbers as data parallelism, layouts, quantization, errors."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import meshes
from jaxsys.checkpoint import Checkpointer
from jaxsys.config import get_preset
from jaxsys.sharding import zero
from jaxsys.sharding.zero import Stage, ZeroOptions, make_schedule
from jaxsys.train import Trainer, TrainConfig, train

TINY = get_preset("tiny")
TC = TrainConfig(steps=10, batch_size=8, seq_len=16, learning_rate=1e-3, warmup_steps=2, log_every=100,
                 ckpt_every=100)
UNQUANTIZED = ZeroOptions(quantized_collectives=False)


class RandomBatches:
    def batch(self, step):
        return np.random.default_rng(500 + step).integers(0, 259, (8, 17), dtype=np.int32)


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def flatten(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def worst(a, b):
    return max(jax.tree.leaves(jax.tree.map(rel_diff, a, b)))


@pytest.fixture(scope="module")
def cpu8():
    return meshes.build_mesh("cpu8")


def strategy_config(strategy, options=UNQUANTIZED):
    return dataclasses.replace(TC, strategy=strategy, zero=options)


def run(trainer, steps):
    state, losses = trainer.init_state(), []
    for step in range(steps):
        state, metrics = trainer.step_fn(state, trainer.put_batch(RandomBatches().batch(step)))
        losses.append(float(metrics["loss"]))
    return state["params"], losses


@pytest.fixture(scope="module")
def ddp(cpu8):
    trainer = Trainer(TINY, strategy_config("ddp"), cpu8)
    params = trainer.init_state()["params"]
    loss, grads = trainer.grads_fn(params, trainer.put_batch(RandomBatches().batch(0)))
    return params, loss, grads, run(trainer, 10)


@pytest.mark.parametrize("strategy", ["zero3", "zeropp", "hier"])
def test_unquantized_schedules_equal_data_parallel(cpu8, ddp, strategy):
    params, ref_loss, ref_grads, (ref_params, ref_losses) = ddp
    trainer = Trainer(TINY, strategy_config(strategy), cpu8)
    sharded = jax.device_put(params, trainer.param_shardings)
    spec = jax.tree.leaves(sharded)[0].sharding.spec
    assert ("gpu", "gcd", "node") in tuple(spec)  # really partitioned over all 8 devices
    loss, grads = trainer.grads_fn(sharded, trainer.put_batch(RandomBatches().batch(0)))
    assert rel_diff(loss, ref_loss) <= 1e-5
    assert worst(grads, ref_grads) <= 1e-5
    final, losses = run(trainer, 10)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Over all parameters 1e-5; per leaf 1e-4, since Adam divides by sqrt(v) and so
    # magnifies reassociation noise in embedding rows whose gradients are nearly zero.
    assert rel_diff(flatten(final), flatten(ref_params)) <= 1e-5
    assert worst(final, ref_params) <= 1e-4


def test_quantized_collectives_stay_close(cpu8, ddp):
    params, ref_loss, ref_grads, _ = ddp
    for strategy in ("zeropp", "hier"):
        trainer = Trainer(TINY, strategy_config(strategy, ZeroOptions()), cpu8)
        loss, grads = trainer.grads_fn(jax.device_put(params, trainer.param_shardings),
                                       trainer.put_batch(RandomBatches().batch(0)))
        assert 0 < rel_diff(loss, ref_loss) <= 1e-3  # int8 weights: close, but not bit-equal
        g, r = flatten(grads), flatten(ref_grads)
        cosine = g @ r / (np.linalg.norm(g) * np.linalg.norm(r))
        # One step of stochastically rounded int4 gradients: unbiased but noisy.
        assert cosine > 0.95, f"{strategy}: int4 gradients point elsewhere (cosine {cosine:.3f})"


def test_schedules_follow_the_design(cpu8):
    zpp = make_schedule("zeropp", cpu8)
    assert zpp.primary == ("gpu", "gcd", "node") and zpp.secondary == ("gpu", "gcd")
    assert zpp.forward == (Stage(("gpu", "gcd", "node"), True),)  # qwZ
    assert zpp.backward == (Stage(("gpu", "gcd")),)  # hpZ: intra-node only
    assert zpp.gradient == (Stage(("gpu", "gcd"), True), Stage(("node",), True))  # qgZ
    hier = make_schedule("hier", cpu8)
    assert [s.axes for s in hier.forward] == [("node",), ("gpu",), ("gcd",)]
    assert [s.axes for s in hier.gradient] == [("gcd",), ("gpu",), ("node",)]
    assert [s.quantized for s in hier.gradient] == [False, False, True]
    assert make_schedule("zeropp", cpu8, ZeroOptions(hpz=False, qgz=False)).backward == zpp.forward
    assert make_schedule("hier", cpu8, ZeroOptions(secondary_partition_size=2)).secondary == ("gcd",)


def test_staged_gathers_and_scatters_match_flat_ones(cpu8):
    """Any stage order gives the layout of one flat collective over P(("gpu","gcd","node"))."""
    primary = ("gpu", "gcd", "node")
    x = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)

    def gathered(stages):
        def local(rows):
            held = ()
            for axes in stages:
                rows, held = zero.gather_stage(rows, held, axes, primary)
            return rows
        return jax.shard_map(local, mesh=cpu8, in_specs=P(primary), out_specs=P(), check_vma=False)(x)

    for stages in ([primary], [("node",), ("gpu",), ("gcd",)], [("gcd",), ("node",), ("gpu",)]):
        np.testing.assert_array_equal(gathered(stages), x)

    full = jax.random.normal(jax.random.key(0), (8, 16, 3))  # one full gradient per device

    def scattered(stages):
        def local(g):
            rows, held = g[0], primary
            for stage in stages:
                rows, held = zero.scatter_stage(rows, held, stage, 256)
            return rows
        return jax.shard_map(local, mesh=cpu8, in_specs=P(("node", "gpu", "gcd")), out_specs=P(primary),
                             check_vma=False)(full)

    expected = np.asarray(full).sum(axis=0)
    for stages in ([Stage(primary)], [Stage(("gcd",)), Stage(("gpu",)), Stage(("node",))]):
        np.testing.assert_allclose(scattered(stages), expected, rtol=1e-5, atol=1e-5)
    quantized = scattered([Stage(("gpu", "gcd"), True), Stage(("node",), True)])
    assert rel_diff(quantized, expected) < 0.15  # int4 with one scale per block


def test_block_quantization_round_trips():
    x = jax.random.normal(jax.random.key(1), (6, 512)) * jnp.linspace(0.1, 10, 512)
    q8, s8 = zero.quantize_int8(x, 256)
    assert q8.dtype == jnp.int8 and s8.shape == (6, 2)
    assert float(jnp.max(jnp.abs(zero.dequantize_int8(q8, s8, jnp.float32) - x))) <= float(jnp.max(s8)) / 2 + 1e-6
    q4, s4 = zero.quantize_int4(x, 256)
    assert q4.shape == (6, 256) and q4.dtype == jnp.int8  # two values per byte
    err = jnp.abs(zero.dequantize_int4(q4, s4, jnp.float32) - x)
    assert float(jnp.max(err)) <= float(jnp.max(s4)) / 2 + 1e-6


def test_stochastic_int4_is_unbiased():
    """Averaged over dithers, stochastic int4 recovers values far below one quantization step."""
    x = jax.random.normal(jax.random.key(2), (4, 64)) * jnp.linspace(0.01, 1.0, 64)  # many tiny values
    draws = 400

    @partial(jax.jit, static_argnums=0)
    def mean_dequantized(stochastic):
        def one(i):  # a relative nudge of 1e-6 changes the tensor's sum, hence its dither seed
            xi = x * (1 + 1e-6 * i)
            return zero.dequantize_int4(*zero.quantize_int4(xi, 64, stochastic=stochastic), jnp.float32)
        return jax.vmap(one)(jnp.arange(draws)).mean(axis=0)

    row_max = np.abs(np.asarray(x)).max(axis=1, keepdims=True)  # one scale per 64-value row
    small = np.abs(np.asarray(x)) < row_max / 14  # under half a step: round-to-nearest sends them to 0
    assert small.sum() > 20
    nearest = np.asarray(mean_dequantized(False))
    dithered = np.asarray(mean_dequantized(True))
    assert np.all(nearest[small] == 0)
    assert rel_diff(dithered[small], np.asarray(x)[small]) < 0.3  # vs 1.0 for round-to-nearest


def test_checkpoints_move_between_strategies(cpu8, tmp_path):
    first = train(TINY, strategy_config("hier", ZeroOptions()), cpu8, RandomBatches(), ckpt_dir=tmp_path,
                  stop_after=3)
    resumed = Trainer(TINY, strategy_config("zero3"), cpu8).restore(Checkpointer(tmp_path), 3)
    assert worst(resumed["params"], first.state["params"]) == 0
    second = train(TINY, strategy_config("zero3"), cpu8, RandomBatches(), ckpt_dir=tmp_path, resume=True,
                   stop_after=2)
    assert second.start_step == 3 and second.end_step == 5 and np.isfinite(second.losses).all()


def test_bad_configurations_are_clear_errors(cpu8):
    flat = meshes.mesh_for_shape(("node",), (8,))
    with pytest.raises(ValueError, match="at least two levels"):
        make_schedule("zeropp", flat)
    with pytest.raises(ValueError, match=r"secondary partition size 3 .* use one of \[2, 4\]"):
        make_schedule("hier", cpu8, ZeroOptions(secondary_partition_size=3))
    odd = dataclasses.replace(TINY, dim=36, n_heads=2, n_kv_heads=1, ffn_dim=60, vocab_size=300)
    with pytest.raises(ValueError, match=r"no dimension divisible by the 8 devices"):
        Trainer(odd, strategy_config("zero3"), cpu8)
    with pytest.raises(ValueError, match="--tensor-parallel"):
        Trainer(TINY, dataclasses.replace(TC, strategy="hier", tensor_parallel="gcd"), cpu8)
