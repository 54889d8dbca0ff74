"""Device meshes and the one table that maps logical axis names to mesh axes.

Models name their parameter axes logically ("embed", "mlp", ...); only this module knows the mesh
axes (`data`, `fsdp`, `tensor`, `expert`). A dimension that a mesh axis does not divide stays
replicated along it, so one rules table serves every preset on every mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill.errors import DistillError

# `context` splits each row's sequence (context parallelism, `distill.models.context`); it sits
# between fsdp and tensor so that tensor, the chattiest axis, stays on the closest devices.
MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")

# logical name -> mesh axis (or axes, tried in order of preference as a group), None = replicated.
AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    # the context axis also shards the weights (as fsdp does): each of its devices holds a
    # different part of every row, so it needs all the parameters only one layer at a time
    ("embed", ("fsdp", "context")),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("experts", "expert"),
    ("q_lora", None),  # MLA query latent (q_lora_rank)
    ("kv_lora", None),  # MLA kv latent + shared rope key (kv_lora_rank + qk_rope_head_dim)
    ("routing", None),  # router outputs: every device scores every expert
    ("lora_rank", None),  # a LoRA adapter's rank axis (R): small, kept whole
    # Activations (`constrain`). Between layers the residual stream [B, T, D] is split over the
    # sequence on "tensor" (sequence parallelism): the tensor-parallel matmuls gather it and
    # scatter their outputs back, and the per-layer activations kept for the backward pass shrink
    # by the tensor size, which long sequences need; with context parallelism the sequence is
    # split over context x tensor.
    ("act_batch", ("data", "fsdp")),
    ("act_seq", ("context", "tensor")),
    ("act_embed", None),
)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise DistillError(f"mesh {text!r}: expected AXIS=N with AXIS in {MESH_AXES}, got {part!r}")
        shape[name] = int(size)
    return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all four axes (missing ones of size 1) over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if math.prod(sizes) != len(devices):
        raise DistillError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available")
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names on `mesh`.

    Each mesh axis is used at most once per array, and only where it divides the dimension.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in axes:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Lay `x` out as its logical axis names say, on the mesh set with `jax.set_mesh(mesh)`.

    Without such a mesh (inference, tests, a mesh lacking distill's axes, or inside `shard_map`)
    `x` is returned unchanged, so models call this freely and still never name a mesh axis.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.are_all_axes_auto or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """NamedSharding of one (possibly abstract) NNX variable from its `out_sharding` names."""
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh):
    """A pytree of NamedShardings matching `state` (works on abstract states from eval_shape)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def params_sharding(state: nnx.State, mesh: Mesh):
    """One NamedSharding per array of a state (a tree of exactly its arrays' structure), as its
    variables' logical names say: what jit's in/out_shardings and device_put take."""
    by_var = state_shardings(state, mesh)
    return jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(
        by_var, is_leaf=lambda x: isinstance(x, NamedSharding)))


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of `module` on `mesh` as its logical names say (returns the module)."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh)))
    return module
