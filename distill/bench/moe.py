"""Routed-expert cost against the number of experts, at fixed top-k and expert width.

    python -m distill.bench.moe [--tokens 512] [--experts 8,64] [--top-k 2] [--dim 512] [--ffn 256]

For each dispatch path and token count, one MoE layer's routing + routed experts is compiled and
timed for every expert count in one interleaved run (this machine is shared and noisy, so only the
ratio between expert counts measured side by side means anything). With dispatch costing in
proportion to top-k, time per token barely moves as experts grow; the "dense" row (every expert on
every token, what the dispatch avoids) is the contrast.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from distill.models.deepseek import experts


def _layer_fn(path: str, top_k: int, n_group: int, capacity_factor: float):
    """jit(x, router, bias, experts...) -> [M, D] for one dispatch path."""

    def fn(x_md, w_router_de, bias_e, wg, wu, wd):
        w_mk, idx_mk = experts.route(x_md, w_router_de, bias_e, top_k=top_k, n_group=n_group,
                                     topk_group=n_group, norm_topk_prob=True, scaling=1.0)
        if path == "dense":  # every expert on every token, weighted by a dense [M, E] gate
            gate_me = jnp.zeros((x_md.shape[0], wg.shape[0]), x_md.dtype)
            gate_me = gate_me.at[jnp.arange(x_md.shape[0])[:, None], idx_mk].set(w_mk)
            h = jax.nn.silu(jnp.einsum("md,edf->mef", x_md, wg)) * jnp.einsum("md,edf->mef", x_md, wu)
            return jnp.einsum("mef,efd,me->md", h, wd, gate_me)
        return experts.routed_experts(x_md, w_mk, idx_mk, wg, wu, wd, dispatch=path,
                                      capacity_factor=capacity_factor)

    return jax.jit(fn)


def _inputs(m: int, e: int, d: int, f: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    scale = d**-0.5
    return (jax.random.normal(keys[0], (m, d)),
            jax.random.normal(keys[1], (d, e)) * scale,
            jax.random.normal(keys[2], (e,)) * 0.01,
            jax.random.normal(keys[3], (e, d, f)) * scale,
            jax.random.normal(keys[4], (e, d, f)) * scale,
            jax.random.normal(keys[5], (e, f, d)) * f**-0.5)


def run(tokens: Sequence[int] = (1, 512), num_experts: Sequence[int] = (8, 64), top_k: int = 2,
        dim: int = 512, ffn: int = 256, paths: Sequence[str] = ("capacity", "ragged", "dense"),
        capacity_factor: float = 2.0, repeats: int = 5) -> list[dict]:
    """Microseconds per token (best of `repeats`, interleaved across expert counts) per case."""
    rows = []
    for m in tokens:
        for path in paths:
            fns = {e: (_layer_fn(path, top_k, 1, capacity_factor), _inputs(m, e, dim, ffn)) for e in num_experts}
            for fn, args in fns.values():
                jax.block_until_ready(fn(*args))  # compile
            best = {e: float("inf") for e in num_experts}
            for _ in range(repeats):
                for e, (fn, args) in fns.items():
                    t = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    best[e] = min(best[e], time.perf_counter() - t)
            kind = "gather" if m * top_k < min(num_experts) and path != "dense" else path
            for e in num_experts:
                rows.append(dict(tokens=m, path=kind, experts=e, us_per_token=1e6 * best[e] / m,
                                 ratio=best[e] / best[num_experts[0]]))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,512")
    p.add_argument("--experts", default="8,64")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--paths", default="capacity,ragged,dense")
    p.add_argument("--capacity-factor", type=float, default=2.0)
    a = p.parse_args(argv)
    rows = run([int(x) for x in a.tokens.split(",")], [int(x) for x in a.experts.split(",")],
               a.top_k, a.dim, a.ffn, a.paths.split(","), a.capacity_factor)
    print(f"backend={jax.default_backend()} top_k={a.top_k} D={a.dim} F={a.ffn} "
          f"capacity_factor={a.capacity_factor}")
    print(f"{'tokens':>6} {'path':>9} {'experts':>7} {'us/token':>10} {'vs first':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['path']:>9} {r['experts']:>7} {r['us_per_token']:>10.1f} "
              f"{r['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
