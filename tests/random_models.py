"""Models with random weights drawn on the host, and packed batches, for the attention and kernel
tests (no checkpoint, no compiled initialiser)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.models.families import model_class
from distill.parallel import state_shardings

TINY_QWEN2 = "configs/students/tiny-qwen2.yaml"
TINY_MOE = "configs/teachers/tiny-moe.yaml"


def random_model(cfg, mesh=None):
    """A model of `cfg` with random weights drawn on the host (norm weights near 1), placed on
    `mesh` as the rules say: much quicker to make than compiling the initialiser."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, nnx.Rngs(0))))
    rng = np.random.RandomState(0)

    def draw(path, x):
        centre = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(centre + 0.1 * rng.randn(*x.shape), x.dtype)

    state = jax.tree_util.tree_map_with_path(draw, state)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    return nnx.merge(graphdef, state)


def packed_batch(t: int, vocab: int):
    """Two rows of packed documents (restarting positions) with trailing padding."""
    rng = np.random.RandomState(1)
    seg = np.zeros((2, t), np.int32)
    seg[0, : t // 3], seg[0, t // 3: t - 7] = 1, 2
    seg[1, : t - 40] = 1
    pos = np.zeros((2, t), np.int32)
    for r in range(2):
        for s_id in (1, 2):
            idx = np.flatnonzero(seg[r] == s_id)
            pos[r, idx] = np.arange(len(idx))
    tokens = rng.randint(0, vocab, (2, t))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(pos), jnp.asarray(seg)
