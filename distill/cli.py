"""The `distill` command line: each subcommand parses, validates, and calls one library function.

Errors a user can fix (bad config, bad path, bad checkpoint) print one line and exit with code 2.
Every command imports its library inside its body: the command line itself imports only click, so
`distill --help` and `distill COMMAND --help` take ~0.1 s instead of the ~3 s JAX and friends need.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from distill.data.benchmarks import BENCHMARKS  # names only: imports nothing beyond the stdlib
from distill.errors import DistillError
from distill.models.settings import ATTENTION, CONTEXT_PARALLEL

MODEL_HELP = ("a Hugging Face model directory, a GGUF file, a students/<run> training directory "
              "(its latest checkpoint), or a model preset YAML (random weights)")


class _RegistryChoice(click.Choice):
    """A click.Choice over a registry's names, read on first use (parsing the option, or its own
    command's --help), so importing the command line still imports only click."""

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        self._names, self.case_sensitive = names, True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._names())


class _RegistryOption(click.Option):
    """An option whose choices and help come from a registry: `load() -> (names, help)`, read on
    first use as `_RegistryChoice` reads them."""

    def __init__(self, *args, load: Callable[[], tuple[tuple[str, ...], str]], **kwargs) -> None:
        self._load = functools.cache(load)
        super().__init__(*args, type=_RegistryChoice(lambda: self._load()[0]), **kwargs)

    def get_help_record(self, ctx: click.Context):
        self.help = self._load()[1]
        return super().get_help_record(ctx)


def _presets() -> tuple[tuple[str, ...], str]:
    from distill.data.schemas import SCHEMAS, preset_help

    return ("auto", *SCHEMAS), preset_help()


def _help_from(**names):
    """Fill a command's docstring (its --help) with the names of registries: `{attention}`."""
    def apply(f):
        f.__doc__ = f.__doc__.format(**{k: " | ".join(v) for k, v in names.items()})
        return f
    return apply


def _configure_jax() -> None:
    """The only place distill configures JAX: a persistent compilation cache for repeat runs.

    Set through JAX's environment variables (read when a command first imports JAX), so the
    command line itself never imports JAX: `--help` stays fast. A user's own settings win."""
    cache = Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "jax"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distill")
def cli() -> None:
    """distill: teach small dense students to reason like a large MoE teacher.

    \b
    The pipeline:  generate -> train -> eval -> export
    Try `distill demo` for the whole flow at toy scale, or `distill sample MODEL --prompt TEXT`.
    """
    from distill.train.orbax_logs import quiet_orbax_logs  # no JAX: --help stays fast

    _configure_jax()
    quiet_orbax_logs()  # a failed checkpoint write is said in one line, not orbax's tracebacks


@cli.command()
@click.argument("config", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(config, overrides, overwrite, quiet):
    """Write verified reasoning traces to teacher_traces/<run>/ (resumable).

    \b
    CONFIG is a run config (see configs/runs/) with sections:
      prompts   source (jsonl / parquet / csv / save_to_disk dir / hub name / synthetic), columns
      teacher   kind: jax (a MODEL path run in-process; engine: slots, max_len) or openai
                (base_url, model, api_key_env)
      sampling  n, temperature, top_p, max_new_tokens, seed, logprobs
      filters   keep correct|complete|all, truncation, <think> format, language mix, dedup, decontamination
      output    root (teacher_traces), prompts_per_shard
    Rerunning the same command resumes after a crash; --overwrite starts over.
    """
    from rich.console import Console

    from distill.traces.generate import run_generate
    from distill.traces.progress import summary_table

    summary = run_generate(config, overrides, overwrite=overwrite, progress=not quiet)
    Console(stderr=True).print(summary_table(summary))
    click.echo(str(summary.run_dir))


@cli.group()
def traces() -> None:
    """Trace datasets: bring public ones into the store (`distill traces import`)."""


@traces.command(name="import")
@click.argument("source")
@click.option("--name", default=None,
              help="The run directory under --out (default: the source's last part).")
@click.option("--preset", default="auto", show_default=True, cls=_RegistryOption, load=_presets)
@click.option("--config", "hub_config", default=None, help="The hub dataset's configuration.")
@click.option("--split", default="train", show_default=True, help="The split to read.")
@click.option("--drop-system", is_flag=True, help="Leave the dataset's system prompts out.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N rows.")
@click.option("--tokenizer", default=None, type=click.Path(),
              help="Counts tokens (needed by filters.max_completion_tokens).")
@click.option("--decontaminate", "benchmarks", multiple=True, metavar="BENCHMARK",
              help=f"Reject prompts that share an 8-gram with a benchmark ({', '.join(BENCHMARKS)}"
                   "; from the hub cache). Local copies: --set filters.decontaminate=[PATH].")
@click.option("--out", "root", default="teacher_traces", show_default=True, type=click.Path(),
              help="The output root.")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field: filters.* (as in generate), output.rows_per_shard, "
                   "source.columns.*.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_(source, name, preset, hub_config, split, drop_system, limit, tokenizer, benchmarks,
            root, overwrite, overrides, quiet):
    """Write SOURCE's reasoning traces into teacher_traces/<name>/ as if generated (resumable).

    \b
    SOURCE is a hub dataset name (open-r1/OpenR1-Math-220k, with --config / --split), a
    save_to_disk folder, or local Parquet / JSONL / JSONL.zst files (a file or a folder).
    Each trace passes generate's filters: the answer re-checked with math-verify against the
    dataset's reference where it has one, truncation, <think> format, language mix, dedup,
    decontamination; every rejection is counted in the manifest. Prints the run directory.
    """
    from rich.console import Console

    from distill.traces.importer import import_config, run_import
    from distill.traces.progress import import_table

    fields = {"preset": preset, "config": hub_config, "split": split, "drop_system": drop_system,
              "limit": limit}
    cfg = import_config(source, name or _source_name(source, hub_config), overrides,
                        source_fields={k: v for k, v in fields.items() if v is not None},
                        tokenizer=tokenizer, decontaminate_benchmarks=list(benchmarks) or None,
                        output={"root": root})
    summary = run_import(cfg, overwrite=overwrite, progress=not quiet)
    Console(stderr=True).print(import_table(summary))
    click.echo(str(summary.run_dir))


def _source_name(source: str, config: str | None) -> str:
    """The default run name: the source's last part (a path's resolved folder or file name
    without its suffixes), with the hub config when there is one."""
    from distill.config import resolve_source

    resolved = resolve_source(source)
    name = os.path.basename(resolved.rstrip("/"))
    for suffix in (".zst", ".jsonl", ".parquet"):
        name = name.removesuffix(suffix)
    return f"{name}-{config}" if config else name or "import"


@cli.command()
@click.argument("config", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_help_from(attention=ATTENTION, context_parallel=CONTEXT_PARALLEL)
def train(config, overrides, quiet):
    """Fine-tune a student on traces, or distil it on-policy, into students/<run>/ (resumable).

    \b
    CONFIG is a training config (see configs/runs/r1-distill-qwen-7b.yaml) with sections:
      student   init (MODEL path or preset), tokenizer, param_dtype, dtype (auto: bfloat16
                on GPU / TPU), remat, context_parallel ({context_parallel}),
                attention ({attention})
      data      traces (teacher_traces/<run> dirs), weights, keep, seq_len, batch_size, top_k
      loss      kind (sft, or a divergence registered in distill.losses: a name it
                does not know gets the list), alpha, beta, temperature, tail_bucket
      onpolicy  on-policy distillation (optional): prompts (as generate's), teacher (kind jax
                in process, or openai: vLLM / SGLang / distill serve scoring prompts),
                fraction (GKD's lambda: the share of on-policy steps; 1 needs no data),
                group_size, prompts_per_step, max_new_tokens, loss (reverse_kl,
                sampled_reverse_kl, jsd, forward_kl), reward_weight
      optim     lr, warmup_steps, schedule, weight_decay, clip_norm
      train     steps or epochs, grad_accum, log/eval/checkpoint intervals
      mesh      e.g. data=1,fsdp=8,tensor=1, or fsdp=2,context=4 to split each row's
                sequence over 4 devices (long rows) (default: every device on fsdp)
    Rerunning the same command resumes from the latest checkpoint. SIGTERM / Ctrl-C save a
    checkpoint before exiting (exit code 143 / 130).
    """
    from distill import multihost
    from distill.train.loop import distributed_settings, lost_host_words, resolved_config, run_train

    cfg = resolved_config(config, overrides)
    addr, num, pid = distributed_settings(cfg.distributed)
    if addr is not None and not multihost.supervised():  # one of several processes
        process = f"process {pid} of {num}" if pid is not None else "this process"
        sys.exit(multihost.supervise(sys.argv[1:], lambda: lost_host_words(cfg), process))
    result = run_train(config, overrides, progress=not quiet)
    if result.stopped:
        click.echo(f"stopped at step {result.step}; checkpoint saved in {result.run_dir} "
                   "(rerun the same command to resume)", err=True)
        sys.exit(143)
    click.echo(str(result.run_dir))


@cli.command(name="eval")
@click.argument("config", type=click.Path(), required=False)
@click.option("--benchmark", default=None, metavar="NAME",
              help=f"A standard benchmark instead of CONFIG's prompts: {', '.join(BENCHMARKS)} "
                   "(its template, answer reading and R1 protocol).")
@click.option("--model", "model", default=None, metavar="MODEL|URL",
              help="With --benchmark and no CONFIG: the model, a MODEL path (in process) or the "
                   "http(s) URL of an OpenAI-compatible server (distill serve, vLLM, SGLang).")
@click.option("--model-name", default=None,
              help="Its name in the report (published numbers are matched by it); for a URL "
                   "also the served model (default: the server's first in /v1/models).")
@click.option("--source", default=None, metavar="PATH",
              help="A local copy of the benchmark (Parquet / JSONL / save_to_disk) instead of "
                   "the hub.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N problems.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
@click.option("--thinking-budgets", "budgets", default=None, metavar="N,N,...",
              help="Run the eval once per thinking budget (s1 budget forcing: the thinking ends "
                   "at N tokens and the model answers), each in <output>/budget-N/, and compare "
                   "pass@1 against thinking tokens in <output>/budgets.md.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_(config, benchmark, model, model_name, source, limit, overrides, budgets, quiet):
    """Evaluate students against the teacher on held-out prompts or a standard benchmark.

    \b
    CONFIG is an eval config with sections:
      prompts         the held-out prompts (as in generate; usually split: heldout)
      benchmark       or a standard benchmark: name, source (a local copy), limit
      models          a list: name, role (student|teacher), kind jax (model: MODEL path) or
                      openai (base_url, model), metrics (metrics.jsonl for the loss plot)
      protocol        k, temperature, top_p, max_new_tokens, seed, greedy (R1's by default;
                      a benchmark sets k and max_new_tokens to its R1 values unless given),
                      answer_reading: open-r1 (lighteval's, as open-r1 measures; a benchmark's
                      default) or strict (the last \\boxed{} after </think>; the prompts')
                      thinking_budget, min_thinking, wait (s1 budget forcing)
      answer_pattern  regex for strict answers without \\boxed{}
      kl              traces: teacher_traces/<run> for per-token KL and top-1 agreement
      output          report directory (default students/eval/<name>)

    \b
    The common case needs no config:
      distill eval --benchmark math500 --model students/qwen-7b
      distill eval --benchmark gpqa --model http://127.0.0.1:8000/v1 --set protocol.n=1
    Prints the Markdown table (with the published pass@1 of a model of the same name, where
    there is one), then the report directory (eval.json, eval.md, samples.jsonl, plots/).
    Resumable: samples stream to <output>.partial/ as they end; rerunning the same command after
    a kill or a full disk samples only the rest.
    """
    from distill.eval.budgets import markdown as budgets_markdown
    from distill.eval.budgets import parse_budgets, run_budget_sweep
    from distill.eval.evaluate import run_eval
    from distill.eval.report import markdown

    run, show = run_eval, markdown
    if budgets is not None:
        swept = parse_budgets(budgets)
        show = budgets_markdown

        def run(config, overrides, **kw):
            return run_budget_sweep(config, overrides, swept, **kw)

    if config is None:
        if benchmark is None or model is None:
            raise click.UsageError("give CONFIG, or --benchmark NAME and --model MODEL|URL")
        report = run(None, overrides, progress=not quiet,
                     data=_benchmark_config(benchmark, model, model_name, source, limit))
    else:
        if model is not None:
            raise click.UsageError("--model goes with --benchmark and no CONFIG; the models of "
                                   "a config are its models: list")
        if benchmark is None and (source or limit):
            raise click.UsageError("--source and --limit go with --benchmark (a config's own "
                                   "prompts take --set prompts.limit=N)")
        extra = [f"benchmark.name={benchmark}", "prompts=null"] if benchmark else []
        extra += [f"benchmark.source={source}"] if source else []
        extra += [f"benchmark.limit={limit}"] if limit else []
        report = run(config, [*extra, *overrides], progress=not quiet)
    click.echo(show(report))
    click.echo(report["output"])


def _benchmark_config(benchmark, model, model_name, source, limit) -> dict:
    from distill.backends.http import served_model
    from distill.eval.config import benchmark_config

    served = None
    if model.startswith(("http://", "https://")):
        served = model_name or served_model(model)
    return benchmark_config(benchmark, model, model_name=model_name, served_name=served,
                            source=source, limit=limit)


@cli.command(help="Write CHECKPOINT as a Hugging Face directory that transformers loads as it is "
             "(a LoRA run: merged into its base, or with --adapter as a PEFT adapter).\n\n"
             f"CHECKPOINT is {MODEL_HELP}.")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16",
              show_default=True, help="Weight dtype of the exported safetensors.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--eval", "eval_report", type=click.Path(), default=None,
              help="An eval.json from `distill eval` to quote in the model card.")
@click.option("--adapter", is_flag=True,
              help="A LoRA run's adapters as a PEFT directory (float32) instead of merged weights.")
def export(checkpoint, out_dir, dtype, force, eval_report, adapter):
    from distill.export import export as run_export

    out = run_export(checkpoint, out_dir, dtype=dtype, force=force, eval_report=eval_report,
                     on_warning=lambda m: click.echo(f"warning: {m}", err=True), adapter=adapter)
    click.echo(f"exported {checkpoint} -> {out} ({'PEFT adapter' if adapter else dtype})")


@cli.command(help="Generate a completion from MODEL with a KV cache and print it.\n\n"
             f"MODEL is {MODEL_HELP}.")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--prompt", required=True, help="The user message (or raw text with --raw).")
@click.option("--system", default=None, help="Optional system message.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0 is greedy decoding.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Weight and compute dtype.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of a preset YAML MODEL, e.g. model.num_hidden_layers=4.")
def sample(model_path, prompt, system, raw, max_new_tokens, temperature, top_p, top_k, seed, dtype,
           overrides):
    from distill.backends.jax import sample_text
    from distill.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed)
    click.echo(sample_text(model_path, prompt, params, system=system, raw=raw, dtype=dtype,
                           overrides=overrides))


@cli.command(help="Serve MODEL over an OpenAI-compatible API: POST /v1/chat/completions (plain or "
             "streaming, reasoning split out as reasoning_content), POST /v1/completions "
             "(vLLM's, with prompt_logprobs: scores given tokens) and GET /v1/models.\n\n"
             f"MODEL is {MODEL_HELP}; it needs a tokenizer with a chat template. Requests run "
             "in the inference engine's slots, each with its own sampling settings, joining as "
             "slots free up; every program is compiled at start (see --no-warmup).")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes the server to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", default=None, help="Name in /v1/models and answers (default: MODEL).")
@click.option("--slots", default=16, show_default=True, type=click.IntRange(1),
              help="Sequences decoded at once (a request with n choices takes n); each holds a "
                   "KV cache of --max-len tokens, so memory grows with slots x max-len.")
@click.option("--max-len", type=click.IntRange(2), default=None,
              help="Prompt plus completion tokens per request (default: the model's context, "
                   "at most 4096); longer requests get HTTP 400.")
@click.option("--no-warmup", "no_warmup", is_flag=True,
              help="Start at once and compile each program when a request first needs it.")
@click.option("--default-max-tokens", default=1024, show_default=True, type=click.IntRange(1),
              help="Token budget of a request that sets no max_tokens.")
@click.option("--api-key-env", metavar="VAR", default=None,
              help="Require the value of environment variable VAR as the bearer token.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Weight and compute dtype.")
def serve(model_path, host, port, model_name, slots, max_len, no_warmup, default_max_tokens,
          api_key_env, dtype):
    from distill.inference import EngineConfig
    from distill.serve.app import serve as run_server

    run_server(model_path, host, port, model_name=model_name, dtype=dtype,
               config=EngineConfig(slots=slots, max_len=max_len), warmup=not no_warmup,
               default_max_tokens=default_max_tokens, api_key_env=api_key_env, echo=click.echo)


@cli.command()
@click.argument("config", type=click.Path())
@click.option("--mesh", required=True,
              help="e.g. data=1,fsdp=16,tensor=4; context=N splits each row over N devices")
@click.option("--seq-len", type=click.IntRange(2), default=None,
              help="Tokens per row: data.seq_len (default: the config's).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Global rows per step: data.batch_size (default: the config's, else one per "
                   "data x fsdp shard).")
@click.option("--mode", type=click.Choice(["train", "generate"]), default="train", show_default=True)
@click.option("--device-memory", default="80GB", show_default=True, help="Memory of one device.")
@click.option("--verdict", type=click.Choice(["larger", "analytic", "compiler"]), default="larger",
              show_default=True,
              help="Which per-device total decides whether it fits (larger: the larger of the two).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
def plan(config, mesh, seq_len, batch, mode, device_memory, verdict, overrides):
    """Memory and FLOPs per device for CONFIG on MESH, without allocating.

    \b
    CONFIG is a training config (student: ...) or a model preset (configs/students/*.yaml,
    configs/teachers/*.yaml). The real step (train) or one decode step against a KV cache of
    --seq-len slots (generate) is compiled ahead of time on fake CPU devices; the table shows the
    analytic count (exact parameter / optimizer / gradient bytes from the shardings, activations
    from the shapes) beside XLA's CPU memory analysis. A training config is checked exactly as
    `distill train` checks it (--mesh, --batch and --seq-len standing in for its mesh,
    data.batch_size and data.seq_len); a plan that does not fit names its largest part. Exit
    code 0: fits, 1: does not fit, 2: a config train would refuse.
    """
    import math

    from distill.parallel import parse_mesh

    _ensure_cpu_devices(math.prod(parse_mesh(mesh).values()))
    from distill.plan import run_plan  # after: a child process with the devices may re-run us

    report = run_plan(config, mesh, seq_len=seq_len, batch=batch, mode=mode,
                      device_memory=device_memory, overrides=overrides, verdict=verdict)
    click.echo(report.table())
    if not report.fits:
        sys.exit(1)


def _suites() -> tuple[str, ...]:
    from distill.bench.suites import SUITES

    return ("all", *SUITES)


@cli.group(invoke_without_command=True)
@click.option("--suite", "suites", multiple=True, default=("all",), show_default=True,
              type=_RegistryChoice(_suites),
              help="Which suite to run (repeat for several); all = every suite, in this order.")
@click.option("--compare", type=click.Choice(["transformers"]), default="transformers",
              show_default=True, help="The reference run side by side in the same process.")
@click.option("--gguf", "gguf_path", type=click.Path(), default=None,
              help="SmolLM2 GGUF file (default: the one `make models` fetched).")
@click.option("--model", "model_path", type=click.Path(), default=None,
              help=f"The engine and onpolicy suites' model: {MODEL_HELP} (default: the SmolLM2 "
                   "GGUF).")
@click.option("--out", "out_dir", type=click.Path(), default="students/bench", show_default=True,
              help="Folder for each suite's JSON file (<suite>.json).")
@click.option("--small/--full", "small", default=None,
              help="The device suite's shapes: tiny presets (default on CPU) or the Qwen2.5-1.5B "
                   "/ 7B shapes at 8k tokens (default on GPU / TPU).")
@click.pass_context
def bench(ctx, suites, compare, gguf_path, model_path, out_dir, small):
    """Benchmarks in suites, run one at a time, each table printed as soon as it is done.

    \b
      decode    greedy decode tokens/s, SmolLM2-135M, batch 1 and 16, vs transformers
      moe       the MoE layer's time per token with 8 vs 64 routed experts
      generate  trace generation in process and over HTTP (distill serve)
      train     the training step vs transformers eager / torch.compile, MFU
      data      the training-data pipeline at R1 scale (200M tokens; see `bench data`)
      device    the accelerator path (one JSON): attention kernels' parity, training MFU of
                the Qwen2.5-1.5B and 7B shapes at 8k packed tokens, decode at batch 1 and
                64 beside the HBM-bandwidth limit, time to first step (sized for < 8 min
                on an H200; not yet run on one)
      engine    the inference engine's targets in one run: utilisation at concurrency 64 vs
                static batching, sampled vs greedy decode step, time to first token,
                compiles after warmup, set_weights (SmolLM2, or --model)
      onpolicy  an on-policy distillation step beside an SFT step on the same student
                (SmolLM2, or --model), with its sampling / scoring / training shares
      lora      full fine-tune vs LoRA r64 vs QLoRA nf4 step on SmolLM2-135M (time, FLOPs,
                memory), and LoRA's loss reduction and adapter file beside a full run's
    """
    if ctx.invoked_subcommand is not None:
        return
    import logging

    from distill.bench.suites import run_suites

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("  %(message)s"))
    for name in ("distill.bench", "distill.models.attention"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    settings = {"gguf": gguf_path, "model": model_path, "out": Path(out_dir), "small": small,
                "tokens": 200_000_000, "steps": 2}
    run_suites(suites, settings, click.echo)


@bench.command("data")
@click.option("--tokens", type=int, default=200_000_000, show_default=True,
              help="Student tokens in the synthetic trace mixture.")
@click.option("--steps", type=int, default=2, show_default=True,
              help="Timed SmolLM2-shaped training steps per side (0: skip the step timing).")
@click.option("--gguf", "gguf_path", type=click.Path(), default=None,
              help="SmolLM2 GGUF file whose tokenizer renders the traces (default: `make models`'s).")
@click.option("--out", "out_dir", type=click.Path(), default="students/bench/data",
              show_default=True, help="Folder for the synthetic traces, the cache and data.json.")
def bench_data(tokens, steps, gguf_path, out_dir):
    """The training-data pipeline at R1 scale: tokenized-cache build throughput against cores x
    the tokenizer's one-core rate (measured in the same run), second-start time, peak RSS, the
    packing plan of 1M documents, the step time of a SmolLM2-shaped student at 4 x 2048 with and
    without the real input pipeline, and the cache's bytes per token (with and without top-k)."""
    from distill.bench import smollm2_path
    from distill.bench.data import main as run_bench

    click.echo(run_bench(str(smollm2_path(gguf_path)), tokens, Path(out_dir), steps))


@bench.command("soak")
@click.option("--minutes", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="How long the load runs.")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Clients, each with one request in flight at a time and its own temperature "
                   "and top-p.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="The largest completion budget (each request draws from max/4 to max).")
@click.option("--warmup-s", type=click.FloatRange(0), default=60.0, show_default=True,
              help="RSS growth is measured from this point of the load on.")
@click.option("--disconnect-every", type=click.IntRange(0), default=20, show_default=True,
              help="Every N-th streaming client hangs up after its first delta (0: none).")
@click.option("--slots", type=click.IntRange(1), default=16, show_default=True,
              help="The server's --slots, and the standalone engine's.")
@click.option("--max-len", type=click.IntRange(2), default=256, show_default=True,
              help="The server's --max-len, and the standalone engine's (the soak's prompts are "
                   "short; a small one keeps the warm-up short).")
@click.option("--baseline-s", type=click.FloatRange(1), default=60.0, show_default=True,
              help="How long the standalone engine (in process, the same requests) runs first.")
@click.option("--model", "model_path", type=click.Path(), default=None,
              help="MODEL to serve (default: the SmolLM2 GGUF `make models` fetched).")
@click.option("--out", "out_path", type=click.Path(), default="students/bench/soak.json",
              show_default=True, help="Where the summary goes (JSON).")
def bench_soak(minutes, concurrency, max_tokens, warmup_s, disconnect_every, slots, max_len,
               baseline_s, model_path, out_path):
    """`distill serve` under sustained load on 127.0.0.1: requests done and failed, p50 / p99
    latency and time to first token, completion tokens/s against the standalone engine's on the
    same requests (measured first, in process), and the server's resident memory after the
    warm-up and at the end (the server runs as its own process)."""
    from distill.bench import smollm2_path
    from distill.bench.soak import SoakConfig, run_soak, soak_table, write_json

    cfg = SoakConfig(seconds=minutes * 60, concurrency=concurrency, max_tokens=max_tokens,
                     warmup_s=warmup_s, disconnect_every=disconnect_every, slots=slots,
                     max_len=max_len, baseline_s=baseline_s)
    summary = run_soak(model_path or smollm2_path(None), cfg, echo=click.echo)
    write_json(Path(out_path), summary)
    click.echo(soak_table(summary))
    if summary["requests_failed"]:
        click.echo(f"failed requests, the first: {summary['errors']}")
        sys.exit(1)


@cli.command()
@click.option("--work-dir", type=click.Path(), default="students/demo", show_default=True,
              help="Where every stage writes (configs, traces, runs, eval, export).")
@click.option("--quick", is_flag=True,
              help="A reduced budget (about 3.5 minutes on 2 cores; the test suite runs it).")
@click.option("--fresh", is_flag=True, help="Delete the work directory first (the cached teacher "
                                            "included).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--student-tokenizer", type=click.Choice(["shared", "other"]), default="shared",
              show_default=True,
              help="other: the students get a vocabulary of their own (fewer merges, no "
                   "'\\boxed{' piece), and the students are SFT, SFT + GOLD and SFT + ULD: "
                   "logit distillation across tokenizers.")
def demo(work_dir, quick, fresh, quiet, student_tokenizer):
    """The whole pipeline at toy scale on CPU, on data and models it makes itself.

    \b
    tokenizer  SentencePiece BPE on the task's corpus (teacher and students share it)
    teacher    a tiny MoE trained on worked solutions of 3-step arithmetic (cached after a run)
    traces     the teacher's checked solutions with top-k log-probabilities
    students   a smaller dense student: SFT, SFT + logit KD, and answers only (the baseline)
    eval       held-out accuracy with 95% intervals, every model
    export     the best student to Hugging Face, reloaded with transformers
    """
    from distill.demo.pipeline import run_demo

    run_demo(work_dir, "quick" if quick else "full", fresh=fresh, progress=not quiet,
             student_tokenizer=student_tokenizer)


def _ensure_cpu_devices(n: int) -> None:
    """Return when this process has n CPU devices; otherwise re-run this command line in a child
    process started with n fake CPU devices (JAX fixes its device count when it first starts) and
    exit with its exit code."""
    import subprocess

    import jax

    if len(jax.devices("cpu")) >= n:
        return
    if os.environ.get("DISTILL_FAKE_DEVICES_CHILD"):
        raise DistillError(f"could not start {n} fake CPU devices")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DISTILL_FAKE_DEVICES_CHILD": "1",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={n}".strip()}
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *sys.argv[1:]], env=env)
    raise SystemExit(proc.returncode)


def main() -> None:
    """Console entry point: one clear line and exit code 2 for user errors."""
    try:
        cli.main(standalone_mode=False)
    except DistillError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # a failed write no stage put in words (stages say what is safe)
        from distill.fsutil import write_error

        reason = write_error(e)
        if reason is None:
            raise
        where = getattr(e, "filename", None)
        click.echo(f"error: {where + ': ' if where else ''}cannot write ({reason})", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
