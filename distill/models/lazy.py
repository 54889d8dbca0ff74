"""Tensors read on demand, in parts: what lets each process of a multi-host load read from a
checkpoint only the slices its devices hold (`distill.models.weights.fill_state`).

A `LazyTensor` has a shape and a dtype and reads any outer product of index sets,
`read((rows, cols, ...))`, one 1-D array of indices per dimension (contiguous ones are read as
slices); `read()` is the whole tensor. The safetensors reader's tensors are lazy
(`distill.models.safetensors_io.StoredTensor`), as are the views the loaders make of them (a
fused tensor's part: `Window`; a dequantized FP8 weight: `distill.models.deepseek.hf`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Index = tuple[np.ndarray, ...]  # one 1-D int array per dimension (an outer product)


class LazyTensor:
    """A tensor whose values are read when asked for, in parts (subclasses define `read`)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: Index | None = None) -> np.ndarray:
        """The values at the outer product of `index` (the whole tensor when None), as a new
        array of shape (len(index[0]), len(index[1]), ...)."""
        raise NotImplementedError

    def __getitem__(self, key) -> Window:
        return Window(self, key if isinstance(key, tuple) else (key,))


def full_index(shape: Sequence[int]) -> Index:
    return tuple(np.arange(n) for n in shape)


def outer_take(array: np.ndarray, index: Index | None) -> np.ndarray:
    """array at the outer product of `index`, copied; contiguous index runs are taken as slices
    (a memory-mapped array is then read only where the part lies)."""
    if index is None:
        return np.array(array)
    box, rest = [], []
    for idx in index:
        idx = np.asarray(idx, np.int64)
        if len(idx) == 0 or np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            start = int(idx[0]) if len(idx) else 0
            box.append(slice(start, start + len(idx)))
            rest.append(None)
        else:
            box.append(slice(None))
            rest.append(idx)
    part = array[tuple(box)]
    if all(r is None for r in rest):
        return np.array(part)
    return part[np.ix_(*(np.arange(n) if r is None else r for n, r in zip(part.shape, rest,
                                                                          strict=True)))]


class Window(LazyTensor):
    """Part of a lazy tensor by basic indexing: an int (the dimension goes) or a slice of step 1
    per leading dimension, the rest whole (`lazy[e, :f]`)."""

    def __init__(self, source: LazyTensor, key: tuple):
        self.source, self.dtype = source, source.dtype
        self._spans: list[tuple[int, int, bool]] = []  # (start, stop, kept) per source dim
        for i, n in enumerate(source.shape):
            k = key[i] if i < len(key) else slice(None)
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise ValueError("a Window takes slices of step 1")
                self._spans.append((start, stop, True))
            else:
                j = int(k) + (n if int(k) < 0 else 0)
                self._spans.append((j, j + 1, False))
        self.shape = tuple(b - a for a, b, kept in self._spans if kept)

    def read(self, index: Index | None = None) -> np.ndarray:
        index = iter(full_index(self.shape) if index is None else index)
        source = tuple(a + next(index) if kept else np.array([a])
                       for a, _, kept in self._spans)
        out = self.source.read(source)
        return out.reshape([len(s) for s, (_, _, kept) in zip(source, self._spans, strict=True)
                            if kept])


def whole(x) -> np.ndarray:
    """A lazy tensor's values, or an array as it is."""
    return x.read() if isinstance(x, LazyTensor) else np.asarray(x)
