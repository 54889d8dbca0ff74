"""Input prefetch: same order, errors where they happen, a clean stop."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from distill.train.prefetch import Prefetch


def test_the_order_and_the_states_are_the_stream_s(tmp_path):
    from distill.data.traces import read_traces
    from distill.tokenizer import Tokenizer
    from distill.train.data import DataState, StreamConfig, TrainData
    from tests import public_datasets as pub
    from tests import toy

    tok = Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path / "tok"))
    data = TrainData.from_mixture(read_traces([str(pub.mixture_of_thoughts(tmp_path / "m.parquet", n=30))]),
                                  tok, StreamConfig(seq_len=128, batch_size=2))
    direct = list(itertools.islice(data.batches(DataState(0, 1)), 12))
    with Prefetch(data.batches(DataState(0, 1)), depth=3) as ahead:
        prefetched = list(itertools.islice(ahead, 12))
    assert [s for _, s in prefetched] == [s for _, s in direct]
    for (a, _), (b, _) in zip(prefetched, direct, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_error_is_raised_at_its_place():
    def items():
        yield from (1, 2)
        raise ValueError("bad row 3")

    ahead = Prefetch(items(), prepare=lambda x: 10 * x)
    assert [next(ahead), next(ahead)] == [10, 20]
    with pytest.raises(ValueError, match="bad row 3"):
        next(ahead)


def test_a_finite_stream_ends_and_close_stops_an_endless_one():
    assert list(Prefetch(iter(range(5)))) == [0, 1, 2, 3, 4]
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    ahead = Prefetch(endless(), depth=2)
    assert next(ahead) == 0
    time.sleep(0.2)  # the thread fills the queue and blocks
    ahead.close()
    assert not any(t.name == "distill-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 5  # it ran at most `depth` (+ the one in hand) ahead
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch(iter(()), depth=0)
