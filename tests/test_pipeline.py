"""Pipeline executor: the same loss, gradients and training run as the unpipelined model."""

import dataclasses

import jax
import numpy as np
import pytest

import meshes
from jaxsys.config import get_preset
from jaxsys.model import ModelDef
from jaxsys.pipeline import Pipeline, PipelineConfig, pipeline_mesh
from jaxsys.train import Trainer, TrainConfig, next_token_loss

# Five layers, so that 2 and 4 stages are necessarily uneven.
FIVE = dataclasses.replace(get_preset("tiny"), n_layers=5)
TC = TrainConfig(steps=2, batch_size=8, seq_len=16, learning_rate=1e-3, warmup_steps=1, log_every=100,
                 ckpt_every=100)


def batch(step):
    return np.random.default_rng(700 + step).integers(0, 259, (8, 17), dtype=np.int32)


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def worst(a, b):
    return max(jax.tree.leaves(jax.tree.map(rel_diff, a, b)))


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the plain model on one device (no mesh, no pipeline)."""
    model = ModelDef(FIVE)
    params = model.init(0)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: next_token_loss(model, p, b)))
    loss, grads = grad_fn(params, batch(0))
    return model, params, loss, grads, grad_fn


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
    """Fresh compiles only. XLA:CPU's in-process collectives meet by op id, and executables
    read back from the persistent compilation cache (tests/conftest.py) can carry one id for
    all their collectives; devices that run independent collectives in different orders then
    wait in each other's rendezvous until XLA aborts. Compiled fresh, the ids differ."""
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # the cache decides once whether it is used; ask again
    yield
    jax.config.update("jax_enable_compilation_cache", previous)
    compilation_cache.reset_cache()


@pytest.mark.parametrize("shape, layers, microbatches, data_strategy, remat, skip_idle", [
    ((2, 2, 2), (3, 2), 2, "ddp", False, False),  # 2 stages x data 2 x tensor 2
    ((4, 2, 1), (2, 1, 1, 1), 4, "ddp", False, True),  # 4 stages, no tensor parallelism, lax.cond
    ((2, 2, 2), (2, 3), 1, "zero3", True, False),  # zero3 over data + tensor parallelism + remat
])
def test_pipelined_loss_and_gradients_equal_the_plain_model(reference, shape, layers,
                                                             microbatches, data_strategy, remat, skip_idle):
    model, params, ref_loss, ref_grads, _ = reference
    mesh = pipeline_mesh(np.arange(8).reshape(shape))
    config = PipelineConfig(layers, microbatches, remat=remat, skip_idle=skip_idle)
    pipe = Pipeline(model, mesh, config, data_strategy=data_strategy)
    staged = pipe.to_pipeline(params)
    if shape[2] > 1:  # really split over the tensor axis
        assert "tensor" in tuple(staged["blocks"]["attn"]["q"].sharding.spec)
    if data_strategy == "zero3":
        assert "data" in tuple(staged["blocks"]["mlp"]["up"].sharding.spec)
    loss, grads = jax.jit(pipe.loss_and_grads)(staged, jax.device_put(batch(0), pipe.batch_sharding))
    assert rel_diff(loss, ref_loss) <= 1e-5
    assert worst(pipe.from_pipeline(grads), ref_grads) <= 1e-5
    # Padded layer slots (past a short stage's count) get no gradient.
    short = int(np.argmin(layers))
    if layers[short] < max(layers):
        padded = jax.tree.map(lambda g: np.asarray(g)[short, layers[short]:], grads["blocks"])
        assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(padded))


def test_pipelined_training_follows_the_plain_run(reference, tmp_path):
    """Two optimizer steps on 2 stages x 2 data x 2 tensor: the losses and weights of plain
    AdamW steps on the unpipelined gradients, saved in the model's own layout."""
    import optax

    from jaxsys.checkpoint import Checkpointer
    from jaxsys.train import make_optimizer, train

    model, params, _, _, grad_fn = reference
    tx = make_optimizer(TC)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    plain_params, opt_state, plain_losses = params, tx.init(params), []
    for step in range(TC.steps):
        loss, grads = grad_fn(plain_params, batch(step))
        updates, opt_state = update(grads, opt_state, plain_params)
        plain_params = optax.apply_updates(plain_params, updates)
        plain_losses.append(float(loss))

    class Batches:
        def batch(self, step):
            return batch(step)

    mesh = pipeline_mesh(np.arange(8).reshape(2, 2, 2))
    tc = dataclasses.replace(TC, strategy="ddp", pipeline=PipelineConfig((3, 2), microbatches=2))
    piped = train(FIVE, tc, mesh, Batches(), ckpt_dir=tmp_path)
    np.testing.assert_allclose(piped.losses, plain_losses, rtol=1e-5)
    saved, _ = Checkpointer(tmp_path).restore(TC.steps, ModelDef(FIVE).shapes)  # the ModelDef layout
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    assert rel_diff(flat(saved), flat(plain_params)) <= 1e-5
    # Norms (vectors) are not decayed although stacking makes them [stages, layers, dim].
    pipe = Pipeline(model, mesh, tc.pipeline)
    mask = pipe.decay_mask(pipe.shapes)
    assert mask["blocks"]["attn_norm"]["weight"] is False and mask["blocks"]["mlp"]["up"] is True


def test_bubble_fraction_is_gpipes():
    assert PipelineConfig((3, 2), microbatches=2).bubble_fraction == pytest.approx(1 / 3)
    assert PipelineConfig((1, 1, 1, 2), microbatches=8).bubble_fraction == pytest.approx(3 / 11)


def test_bad_pipelines_are_clear_errors(reference):
    model = reference[0]
    mesh = pipeline_mesh(np.arange(8).reshape(2, 2, 2))
    with pytest.raises(ValueError, match=r"sum to 4, but the model has 5 layers"):
        Pipeline(model, mesh, PipelineConfig((2, 2), 2))
    with pytest.raises(ValueError, match=r"3 stages .* stage=2"):
        Pipeline(model, mesh, PipelineConfig((2, 2, 1), 2))
    with pytest.raises(ValueError, match="at least one layer"):
        PipelineConfig((5, 0), 2)
    wide = pipeline_mesh(np.arange(8).reshape(2, 1, 4))
    with pytest.raises(ValueError, match=r"tensor parallelism 4 must divide n_kv_heads=2"):
        Pipeline(model, wide, PipelineConfig((3, 2), 2))
    with pytest.raises(ValueError, match=r"\(stage, data, tensor\)|axes \('stage', 'data', 'tensor'\)"):
        Pipeline(model, meshes.mesh_for_shape(("node",), (8,)), PipelineConfig((3, 2), 2))
    with pytest.raises(ValueError, match=r"batch_size=8 / grad_accum=1 must divide .* x 8 pipeline microbatches"):
        Trainer(FIVE, dataclasses.replace(TC, strategy="ddp", pipeline=PipelineConfig((3, 2), 8)), mesh)
    with pytest.raises(ValueError, match="--strategy ddp or zero3"):
        Trainer(FIVE, dataclasses.replace(TC, strategy="hier", pipeline=PipelineConfig((3, 2), 2)), mesh)
