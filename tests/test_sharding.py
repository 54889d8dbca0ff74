"""The same model on a fake 8-device mesh (fsdp=4 x tensor=2) equals the unsharded one."""

import jax
import numpy as np
import pytest
from flax import nnx

import distill
from distill.parallel import logical_to_spec, make_mesh, shard_module
from tests.helpers import our_logits, save_hf, tiny_hf


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "conftest should give JAX 8 CPU devices"
    return make_mesh({"fsdp": 4, "tensor": 2})


def _split_as_named(var, mesh):
    """Check each dim of the array is split exactly as the rules table says."""
    names = var.get_metadata()["out_sharding"]
    spec = logical_to_spec(names, var.shape, mesh)
    arr = var[...]
    assert arr.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), arr.ndim)
    shard_shape = arr.addressable_shards[0].data.shape
    expected = list(var.shape)
    for i, axis in enumerate(spec):
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        for a in axes:
            expected[i] //= mesh.shape[a]
    assert list(shard_shape) == expected, (names, var.shape, shard_shape)
    return spec


def test_sharded_logits_equal_unsharded(tmp_path, mesh):
    ref = tiny_hf("qwen2", heads=8, kv_heads=2, hidden=128, vocab=256)
    src = save_hf(ref, tmp_path / "hf")
    plain, _ = distill.load_pretrained(src)
    sharded, _ = distill.load_pretrained(src, mesh=mesh)
    ids = np.random.RandomState(0).randint(0, 256, (4, 32))
    np.testing.assert_allclose(our_logits(sharded, ids), our_logits(plain, ids), atol=1e-5, rtol=0)

    split = {}
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        split[".".join(path)] = _split_as_named(var, mesh)
    # the rules really split the big matrices over both axes
    assert split["blocks.attn.wq_dnh"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert split["blocks.mlp.w_down_fd"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert split["embed.embedding_vd"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert split["lm_head_dv"] == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_a_run_directory_loads_onto_a_mesh(tmp_path, mesh):
    """A training run's directory (what `student.init` of an on-policy run names) loads sharded,
    with the same logits as unsharded."""
    from distill.runs import MODEL
    from distill.train.checkpoint import Checkpoints
    from distill.train.step import TrainState

    model, _ = distill.load_pretrained("configs/students/tiny-llama.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / MODEL).write_text(model.config.model_dump_json())
    ckpts = Checkpoints(run / "checkpoints", keep=1, async_save=False)
    ckpts.save(1, TrainState(nnx.state(model), {}, np.int32(1)), {}, force=True)
    ckpts.close()
    plain, _ = distill.load_pretrained(run)
    sharded, _ = distill.load_pretrained(run, mesh=mesh)
    ids = np.random.RandomState(0).randint(0, plain.config.vocab_size, (4, 16))
    np.testing.assert_allclose(our_logits(sharded, ids), our_logits(plain, ids), atol=1e-5, rtol=0)


def test_shard_module_and_random_init_on_mesh(mesh):
    from distill.pretrained import init_model

    model, _ = distill.load_pretrained("configs/students/tiny-llama.yaml")
    sharded = init_model(model.config, seed=0, mesh=mesh)
    ids = np.random.RandomState(1).randint(0, 512, (2, 16))
    np.testing.assert_allclose(our_logits(sharded, ids), our_logits(model, ids), atol=1e-5, rtol=0)
    moved = shard_module(model, mesh)
    w = moved.blocks.mlp.w_gate_df[...]
    assert len({s.device for s in w.addressable_shards}) == 8


def test_indivisible_dims_stay_replicated(mesh):
    # kv_heads=2 over tensor=2 splits; 3 does not divide -> replicated along that axis
    assert logical_to_spec(("kv_heads", "head_dim"), (3, 16), mesh) == jax.sharding.PartitionSpec(None, None)
    assert logical_to_spec(("embed", "mlp"), (64, 6), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
