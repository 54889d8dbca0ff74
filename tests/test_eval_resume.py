"""`distill eval` resumes sample by sample: `kill -9` at three random moments, then a rerun, ends
with the report and samples.jsonl of an uninterrupted run, and no stored sample is drawn twice,
through a model in process and one served by `distill serve`; a rerun with another protocol on
the same output is refused in one line. (A full disk during eval: tests/test_faults.py.)"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import yaml

from distill.eval.samples import SAMPLES, work_dir
from distill.sampling import sample_seed

from . import toy
from .helpers import assert_user_error, invoke_cli, run_cli, shared_compile_cache, start_cli
from .runs import wait_for

REPO = Path(__file__).resolve().parents[1]
PROMPTS, N, SEED = 5, 3, 4
PER_MODEL = PROMPTS * (N + 1)  # n samples and a greedy one per prompt
MODELS = ("served", "local")


class Requests:
    """An ASGI wrapper that records the (seed, greedy) of every chat request it passes on."""

    def __init__(self, app):
        self.app, self.state, self.seen = app, app.state, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            data = json.loads(body)
            self.seen.append((data["seed"], data["temperature"] == 0))
            replayed = iter([{"type": "http.request", "body": body, "more_body": False}])

            async def replay():
                return next(replayed, None) or await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A toy Qwen2 behind `distill serve`'s app (in a thread of this process), with its log."""
    import distill
    from distill.inference import EngineConfig
    from distill.serve.app import ServerThread, build_app

    model_dir = toy.qwen2_dir(tmp_path_factory.mktemp("served") / "toy", seed=1)
    model, tokenizer = distill.load_pretrained(model_dir)
    app = Requests(build_app(model, tokenizer, "toy", config=EngineConfig(slots=2)))
    with ServerThread(app) as url:
        yield url, app


def write_config(path: Path, local: Path, url: str, out: Path, **protocol) -> Path:
    path.write_text(yaml.safe_dump({
        "prompts": {"source": "synthetic", "synthetic": {"n": PROMPTS, "seed": 2}},
        "models": [{"name": "served", "kind": "openai", "base_url": f"{url}/v1", "model": "toy",
                    "concurrency": 2},
                   {"name": "local", "model": str(local), "engine": {"slots": 2}}],
        "protocol": {"n": N, "max_new_tokens": 24, "seed": SEED, **protocol},
        "output": str(out)}))
    return path


def stored(out: Path) -> list[tuple]:
    """The keys of the whole lines in the work folder's samples.jsonl (a torn last one aside)."""
    path = work_dir(out) / SAMPLES
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    rows = [json.loads(x) for x in lines]
    return [(r["model"], r["prompt_id"], r["sample_index"], r["greedy"]) for r in rows]


def request_key(key: tuple) -> tuple[int, bool]:
    """The (seed, greedy) a served sample is asked with."""
    _, prompt_id, index, greedy = key
    return sample_seed(SEED, prompt_id, index), greedy


def strip_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timing"}


def test_kill_9_at_three_moments_then_rerun_equals_an_uninterrupted_run(tmp_path, served):
    url, app = served
    local = toy.qwen2_dir(tmp_path / "local")
    env = {"JAX_PLATFORMS": "cpu", **shared_compile_cache()}
    (tmp_path / "a").mkdir()  # the same config name (the report's) in another folder
    # in a process of its own, first: the runs below load what it compiled
    done = run_cli(["eval", write_config(tmp_path / "a" / "eval.yaml", local, url,
                                         tmp_path / "ref"), "--quiet"], cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((tmp_path / "ref" / "eval.json").read_text())
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "eval.yaml", local, url, out)
    rng, total = random.Random(0), 2 * PER_MODEL
    # kill once the file holds k lines: k drawn in each third of the samples (the first third
    # while the served model samples, the last while the local one does), a few short of its
    # end, as a sample or two more may land before the kill does
    for third in range(3):
        keys = stored(out)
        asked = len(app.seen)
        k = max(len(keys) + 1,
                rng.randrange(third * total // 3 + 1, (third + 1) * total // 3 - 4))
        proc = start_cli(["eval", cfg, "--quiet"], cwd=REPO, env=env)
        assert wait_for(lambda k=k, proc=proc: len(stored(out)) >= k or proc.poll() is not None,
                        120)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = stored(out)
        assert len(after) == len(set(after)) < total, "a sample stored twice, or the run ended"
        assert after[:len(keys)] == keys  # what was there stays
        # the server was never asked again for a sample already stored
        again = set(app.seen[asked:]) & {request_key(x) for x in keys if x[0] == "served"}
        assert not again, again
    keys, asked = stored(out), len(app.seen)
    proc = start_cli(["eval", cfg, "--quiet"], cwd=REPO, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert strip_timing(report) == strip_timing(reference) | {"output": str(out)}
    assert (out / "samples.jsonl").read_text() == (tmp_path / "ref" / "samples.jsonl").read_text()
    assert not work_dir(out).exists()  # the work folder goes once the report is in place
    # the last run drew exactly what was missing, model by model
    for name in MODELS:
        have = sum(x[0] == name for x in keys)
        assert report["timing"][name]["resumed"] == have
        assert report["timing"][name]["samples"] == PER_MODEL - have
    missing = {request_key(x) for x in stored_all(reference, "served")} - {
        request_key(x) for x in keys if x[0] == "served"}
    assert sorted(app.seen[asked:]) == sorted(missing)


def stored_all(report: dict, model: str) -> list[tuple]:
    """Every key of `model` in a finished report's samples.jsonl."""
    rows = [json.loads(x) for x in Path(report["output"], "samples.jsonl").read_text().splitlines()]
    return [(r["model"], r["prompt_id"], r["sample_index"], r["greedy"]) for r in rows
            if r["model"] == model]


def test_a_rerun_with_another_protocol_is_refused_in_one_line(tmp_path):
    from distill.data.prompts import load_prompts
    from distill.data.records import Sample
    from distill.eval.evaluate import load_eval_config, sample_fingerprint
    from distill.eval.samples import SampleStore

    out = tmp_path / "out"
    local = toy.qwen2_dir(tmp_path / "local")
    cfg = write_config(tmp_path / "eval.yaml", local, "http://127.0.0.1:9", out)
    config = load_eval_config(cfg)
    folder = work_dir(out)
    store = SampleStore.open(folder, sample_fingerprint(config, load_prompts(config.prompts)))
    store.add("served", "p", Sample(0, "text", "stop", 3, 1), greedy=False)  # what a run left
    store.close()
    line = assert_user_error(invoke_cli(["eval", cfg, "--quiet", "--set",
                                         "protocol.temperature=0.7"], cwd=REPO),
                             f"{folder}: holds samples of another configuration (it differs in "
                             f"protocol.temperature); rerun with the config that made them, or "
                             f"remove {folder} to start afresh")
    assert line.startswith("error: ") and not out.exists()
    assert stored(out) == [("served", "p", 0, False)]  # left as it was


def test_a_torn_last_line_is_cut_off_and_sampled_again(tmp_path):
    from distill.data.records import Sample
    from distill.eval.samples import SampleStore

    folder, print_ = tmp_path / "out.partial", {"protocol": {"n": 2}}
    store = SampleStore.open(folder, print_)
    for i in range(3):
        store.add("m", "p", Sample(i, f"text {i}", "stop", 3, 2), greedy=i == 2)
    store.close()
    whole = (folder / SAMPLES).read_bytes()
    with open(folder / SAMPLES, "ab") as f:
        f.write(b'{"model": "m", "prompt_id": "p", "sample_in')  # a kill -9 mid-write
    again = SampleStore.open(folder, print_)
    assert list(again.rows) == [("m", "p", 0, False), ("m", "p", 1, False), ("m", "p", 2, True)]
    assert (folder / SAMPLES).read_bytes() == whole  # cut back to the whole lines
    again.add("m", "q", Sample(0, "more", "length", 3, 2), greedy=False)
    assert stored(tmp_path / "out")[-1] == ("m", "q", 0, False)  # appended after the whole lines
    again.remove()
    assert not folder.exists() and again.added == 1
