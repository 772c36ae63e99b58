"""The ``memfit`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from memfit.eval.demo import DEMO_ROWS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="memfit: long-context inference that fits.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON.")
app.add_typer(bench_app, name="bench")
store_app = typer.Typer(no_args_is_help=True, help="Compressed contexts kept in a store (file://DIR, redis://host:port/db).")
app.add_typer(store_app, name="store")

LAYERS_OPTION = typer.Option(32, help="Decoder layers (32 = Llama-3.1-8B).")  # the GPU benchmarks' model depth


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _load(model: str, dtype: Optional[str] = None, weight_bits: Optional[int] = None, kv_dtype: Optional[str] = None):
    import memfit

    try:
        return memfit.load_model(model, dtype=dtype, weight_bits=weight_bits, kv_dtype=kv_dtype)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _policy(spec: str):
    from memfit.kv.policy import PolicyError, parse_policy

    try:
        return parse_policy(spec)
    except PolicyError as e:
        _fail(f"bad policy: {e}")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _need_cuda(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        _fail(f"{what} needs a CUDA GPU")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@app.command()
def ask(
    question: str = typer.Option(..., "--question", "-q", help="The question."),
    context: str = typer.Option(..., "--context", "-c", help="Context file, or - for standard input."),
    policy: str = typer.Option("none", "--policy", "-p", help='Compression spec, e.g. "snapkv(keep=0.25)+kivi(bits=2)".'),
    model: str = typer.Option("smollm2", "--model", "-m", help="smollm2, a .gguf file or a HF model folder."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    answer_prefix: Optional[str] = typer.Option(None, "--answer-prefix", help="Start the answer with this text."),
    store: Optional[list[str]] = typer.Option(None, "--store", "-s", help="Store URL(s), fastest first: reuse a "
                                              "stored compressed context, or store this one."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Instead of --policy: a KV size (8MiB) or a "
                                         "compression factor (16x); the planner picks the policy."),
) -> None:
    """Answer a question about a context, and print the memory figures."""
    pol = _policy(policy)
    text = _read_context(context)
    st = _open_store(store) if store else None
    lm = _load(model)
    if budget is not None:
        b = budget.strip().lower()
        try:
            ctx = lm.prefill(text, budget=float(b[:-1]) if b.endswith("x") else budget, store=st)
        except ValueError as e:
            _fail(str(e))
        pol = ctx.policy
        typer.echo(f"[budget {budget}: planner picked {pol.spec}]", err=True)
    else:
        from memfit.store import StoreUnavailable

        try:
            ctx = lm.prefill(text, pol, store=st)
        except StoreUnavailable as e:  # the store only saves a later prefill: answer all the same
            typer.echo(f"[warning: {e}; answering without storing]", err=True)
            ctx = lm.prefill(text, pol)
    t0 = time.perf_counter()
    answer = lm.ask(ctx, question, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix)
    typer.echo(answer)
    typer.echo(
        f"[{ctx.num_tokens} tokens | policy {pol.spec} | KV {_mib(ctx.nbytes)} vs {_mib(ctx.full_nbytes)} 16-bit "
        f"({ctx.compression:.2f}x) | {'restored' if ctx.meta.get('store') == 'hit' else 'prefill'} "
        f"{ctx.prefill_seconds:.2f}s, answer {time.perf_counter() - t0:.1f}s]",
        err=True,
    )


def _read_context(context: str) -> str:
    if context == "-":
        text = sys.stdin.read()
    else:
        path = Path(context)
        if not path.is_file():
            _fail(f"context file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        _fail("the context is empty")
    return text


def _open_store(urls: list[str]):
    from memfit.store import open_store

    try:
        return open_store(urls)
    except ValueError as e:
        _fail(str(e))


@store_app.command("put")
def store_put(
    context: str = typer.Option(..., "--context", "-c", help="Context file, or - for standard input."),
    policy: str = typer.Option("none", "--policy", "-p"),
    store: list[str] = typer.Option(..., "--store", "-s", help="Store URL(s), fastest first."),
    model: str = typer.Option("smollm2", "--model", "-m"),
) -> None:
    """Compress a context and store it; prints its key."""
    pol = _policy(policy)
    text = _read_context(context)
    st = _open_store(store)
    lm = _load(model)
    from memfit.store import StoreUnavailable

    try:
        ctx = lm.prefill(text, pol, store=st)
    except StoreUnavailable as e:
        _fail(str(e))
    typer.echo(ctx.key)
    typer.echo(f"[{ctx.meta.get('store')}: {ctx.num_tokens} tokens, {_mib(ctx.nbytes)} ({ctx.compression:.2f}x), "
               f"{ctx.prefill_seconds:.2f}s]", err=True)


@store_app.command("ls")
def store_ls(store: list[str] = typer.Option(..., "--store", "-s")) -> None:
    """List stored contexts (key, tier, tokens, policy, bytes)."""
    st = _open_store(store)
    for tier in st.tiers:
        for key in tier.keys():
            try:
                e = tier.get(key)
            except Exception as err:  # noqa: BLE001 - report, keep listing
                typer.echo(f"{key}  {tier.name:<5} unreadable: {err}")
                continue
            if e is not None:
                m = e.manifest
                typer.echo(f"{key}  {tier.name:<5} {m.get('num_tokens', '?'):>7} tokens  {_mib(e.nbytes):>12}  {m.get('policy')}")


@store_app.command("rm")
def store_rm(key: str = typer.Argument(...), store: list[str] = typer.Option(..., "--store", "-s")) -> None:
    """Delete a stored context from every tier."""
    from memfit.store import StoreUnavailable

    st = _open_store(store)
    try:
        removed = st.delete(key)
    except (ValueError, StoreUnavailable) as e:
        _fail(str(e))
    if not removed:
        _fail(f"no stored context {key}")
    typer.echo(f"removed {key}")


@app.command()
def info(
    model: str = typer.Option("smollm2", "--model", "-m"),
    device: bool = typer.Option(False, "--device", help="Also say where it would run and in which dtypes "
                                "(imports torch: ~3 s on a small CPU)."),
) -> None:
    """Print the model, its KV bytes per token and the available methods (reads the config only)."""
    from memfit.kv.plan import KVShape
    from memfit.kv.policy import describe_methods
    from memfit.models import config_dict

    try:
        cfg = config_dict(model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))
    shape = KVShape.from_config(cfg)
    per_token = shape.full_bytes_per_token
    typer.echo(f"model: {model} ({cfg.get('model_type')}, {shape.num_layers} layers, {cfg['num_attention_heads']} "
               f"query / {shape.num_kv_heads} KV heads, head_dim {shape.head_dim})")
    if device:
        from memfit.models import default_device, native_dtype

        where = default_device()
        compute, kv = native_dtype(where)
        typer.echo(f"on {where}: computes in {str(compute).removeprefix('torch.')}, caches store "
                   f"{str(kv or compute).removeprefix('torch.')}")
    typer.echo(f"KV bytes per token (16-bit): {per_token} ({per_token / 1024:.1f} KiB)")
    typer.echo("methods (spec: name(arg=value,...), chained with +, evictions before quantization):")
    typer.echo("  none")
    for name, args in describe_methods().items():
        typer.echo(f"  {name}({args})")


@app.command()
def demo(
    model: str = typer.Option("smollm2", "--model", "-m"),
    rows: list[str] = typer.Option(list(DEMO_ROWS), "--policy", "-p", help="A policy spec, or budget=N (N times "
                                   "smaller than 16-bit) / budget=SIZE (8MiB) for the planner's pick. Repeat."),
    sentences: int = typer.Option(140, help="Document length in filler sentences (140: about 2.1K tokens)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("results/demo"), "--out", "-o", help="Folder for demo.json and pareto.png."),
) -> None:
    """The main job: one ~3K-token document, seven planted facts, asked under the planner's budgets,
    plain KIVI and an eviction baseline; prints a table and writes a Pareto plot."""
    from tqdm import tqdm

    from memfit.eval.demo import parse_row, run_demo
    from memfit.eval.plots import plot_demo

    for r in rows:
        kind, value = parse_row(r)
        if kind == "policy":
            _policy(value)  # a bad spec fails here, before the model loads
    lm = _load(model)
    with tqdm(total=1 + len(rows), desc="demo", unit="step", file=sys.stderr) as bar:
        try:
            records = run_demo(lm, rows, sentences, seed, progress=bar.update)
        except ValueError as e:  # e.g. a budget too small for any policy
            _fail(str(e))
    typer.echo(f"\n{records[0]['tokens']} context tokens, {records[0]['questions']} questions, model {model}; "
               f"one prefill ({records[0]['shared_prefill_s']:.1f} s, KVzip scoring included) compressed per row")
    w = max(44, *(len(r["short_policy"]) for r in records))  # whole specs: a cut one would not parse back
    typer.echo(f"{'row':<11} {'policy':<{w}} {'KV MiB':>7} {'compr.':>7} {'correct':>8} {'answer s':>9}")
    for r in records:
        label = r["row"] if r["row"].startswith("budget=") else ""
        typer.echo(f"{label:<11} {r['short_policy']:<{w}} {r['kv_bytes'] / 2**20:>7.2f} {r['compression']:>6.2f}x "
                   f"{r['correct']:>4}/{r['questions']:<3} {r['answer_s']:>9.1f}")
    typer.echo("\nexpected: " + " | ".join(records[0]["expected"]))
    for r in records:
        typer.echo(f"{(r['row'] if r['row'].startswith('budget=') else r['short_policy'])[:24]:<24} "
                   + " | ".join(a[:14] for a in r["answers"]))
    _write_json(out / "demo.json", records)
    png = plot_demo(records, out / "pareto.png", f"{records[0]['tokens']}-token document, {model}")
    typer.echo(f"\nwrote {out / 'demo.json'} and {png} (correct answers vs KV size)")


DEFAULT_EVAL_POLICIES = ["none", "kivi(bits=4)", "kivi(bits=2)", "snapkv(keep=0.25)", "streaming(keep=0.25)"]


@app.command("eval")
def eval_(
    tasks: Optional[list[str]] = typer.Option(None, "--task", "-t", help="Repeat; 'all' for every task; default: the "
                                              "tasks SmolLM2 can do uncompressed (see README)."),
    policies: list[str] = typer.Option(DEFAULT_EVAL_POLICIES, "--policy", "-p", help="Repeat to compare several."),
    lengths: list[int] = typer.Option([1024, 2048], "--length", "-n", help="Context length in tokens; repeat."),
    samples: int = typer.Option(5, "--samples", "-s"),
    seed: int = typer.Option(0),
    models: list[str] = typer.Option(["smollm2"], "--model", "-m", help="Repeat to compare perplexities of several "
                                     "(e.g. folders written by memfit quantize); tasks run on one model."),
    weight_bits: Optional[list[int]] = typer.Option(None, "--weight-bits", help="Read an any-precision model at these "
                                                    "widths; repeat."),
    out: Path = typer.Option(Path("results/eval"), "--out", "-o", help="Folder for results.jsonl and summary.json."),
    with_perplexity: bool = typer.Option(False, "--perplexity", help="Also report each policy's perplexity."),
    perplexity_only: bool = typer.Option(False, "--perplexity-only", help="Only perplexity: no tasks."),
    perplexity_text: Optional[Path] = typer.Option(None, help="Text for --perplexity (default: the shipped essay)."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    follow_up: bool = typer.Option(False, "--follow-up", help="Ask a sample's questions as one conversation "
                                   "(each turn reads the earlier questions and their reference answers, as in "
                                   "SCBench's multi-turn setting) instead of each on its own."),
    own_answers: bool = typer.Option(False, "--own-answers", help="With --follow-up: the earlier turns hold the "
                                     "model's own answers instead of the reference ones."),
    every_order: bool = typer.Option(False, "--every-order", help="Ask a sample's questions in every rotation, so "
                                     "that each is asked once at every position (paired per-position accuracy; "
                                     "costs one pass per question)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype (bfloat16, float16, float32; default: "
                                        "the device's native one)."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="What caches store unquantized entries in "
                                           "(e.g. --dtype float32 --kv-dtype bfloat16 on a GPU computes as a CPU "
                                           "without bfloat16 arithmetic does)."),
) -> None:
    """Accuracy of each policy on the built-in long-context tasks (one prefill per sample, shared),
    and with --perplexity the perplexity of each model and policy."""
    from memfit.eval.runner import format_summary, run_eval, summarize
    from memfit.eval.tasks import DEFAULT_TASKS, TASKS

    pols = [_policy(p).spec for p in policies]
    if perplexity_only or len(models) > 1 or weight_bits:
        if not (with_perplexity or perplexity_only):
            _fail("several models or --weight-bits are compared by perplexity: add --perplexity-only")
        return _compare_perplexity(models, weight_bits, pols, perplexity_text, out)
    model = models[0]
    names = list(TASKS) if tasks == ["all"] else (tasks or DEFAULT_TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        _fail(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}")
    if samples < 1 or any(n < 64 for n in lengths):
        _fail("--samples must be >= 1 and every --length >= 64")
    if own_answers and not follow_up:
        _fail("--own-answers goes with --follow-up")
    mode = ("own" if own_answers else "gold") if follow_up else None
    lm = _load(model, dtype, kv_dtype=kv_dtype)
    t0 = time.perf_counter()
    records = run_eval(lm, names, pols, lengths, samples, seed, out, max_new_tokens, follow_up=mode,
                       every_order=every_order)
    rows = summarize(records)
    summary = {"model": model, "tasks": names, "lengths": lengths, "samples": samples, "seed": seed,
               "follow_up": mode, "every_order": every_order,
               "seconds": time.perf_counter() - t0, "rows": rows}
    if with_perplexity:
        summary["perplexity"] = {p: v for p, (v, _) in _perplexities(lm, perplexity_text, pols).items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    typer.echo(format_summary(rows))
    if "perplexity" in summary:
        typer.echo("\nperplexity: " + ", ".join(f"{p}: {v:.3f}" for p, v in summary["perplexity"].items()))
    typer.echo(f"\n{len(records)} records in {summary['seconds']:.0f} s -> {out / 'results.jsonl'}, {out / 'summary.json'}")


@app.command()
def calibrate(
    tasks: Optional[list[str]] = typer.Option(None, "--task", "-t", help="Repeat; default: the default eval tasks."),
    length: int = typer.Option(1024, "--length", "-n", help="Context length in tokens."),
    samples: int = typer.Option(6, "--samples", "-s", help="Samples a task."),
    seed: int = typer.Option(0),
    model: str = typer.Option("smollm2", "--model", "-m"),
    out: Path = typer.Option(Path("results/calibration.json"), "--out", "-o", help="Where the table goes (the "
                             "planner reads src/memfit/kv/calibration.json)."),
    add: bool = typer.Option(False, "--add", help="Keep the tables --out already holds for other context lengths "
                             "(one of this length is replaced): the planner reads the one nearest a context's length."),
) -> None:
    """Measure the planner's families (a quantizer, or an eviction at several keeps then a quantizer)
    against an uncompressed cache, and write the table the budget planner chooses by."""
    from memfit.eval.calibrate import calibrate as run
    from memfit.eval.tasks import DEFAULT_TASKS, TASKS

    names = tasks or DEFAULT_TASKS
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        _fail(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}")
    if samples < 1 or length < 64:
        _fail("--samples must be >= 1 and --length >= 64")
    kept = []
    if add:  # read before the long run: a file that is not a table fails now, not after it
        from memfit.kv.plan import check_lengths, read_tables, tables_dict

        try:
            kept = [t for t in (read_tables(out) or ()) if t.length != length]
        except ValueError as e:
            _fail(str(e))
        try:
            check_lengths(kept)  # what tables_dict will ask of them, asked now
        except ValueError as e:
            _fail(f"{out}: {e}")
    lm = _load(model)
    try:
        table = run(lm, names, length, samples, seed, out_dir=out.with_suffix(""))
    except ValueError as e:
        _fail(str(e))
    _write_json(out, tables_dict([*kept, table]) if kept else table.to_dict())
    for f in table.families:
        typer.echo(f"{f.template:<56} " + "  ".join(f"{c:.2f}x {100 * r:.0f}%" for c, r in f.points))
    typer.echo(f"-> {out}")


def _compare_perplexity(models: list[str], weight_bits: Optional[list[int]], policies: list[str],
                        path: Optional[Path], out: Path) -> None:
    from memfit.weights import weight_bytes

    rows = []
    for name in models:
        for bits in weight_bits or [None]:
            lm = _load(name, weight_bits=bits)
            nbytes = weight_bytes(lm.model)["total"]
            for p, (v, kv_bits) in _perplexities(lm, path, policies).items():
                rows.append({"model": name, "weight_bits": bits, "policy": p, "perplexity": v, "weight_bytes": nbytes,
                             "kv_bits_per_element": kv_bits})
                typer.echo(f"{name}{f' @{bits}-bit' if bits else ''}  {p}: perplexity {v:.3f}, KV {kv_bits:.3f} bits "
                           f"an element, weights {_mib(nbytes)}")
    _write_json(out / "perplexity.json", rows)
    typer.echo(f"-> {out / 'perplexity.json'}")


def _perplexities(lm, path: Optional[Path], policies: list[str]) -> dict[str, tuple[float, float]]:
    """Each policy's perplexity and its KV bits an element, everything counted."""
    from memfit.eval.perplexity import SHIPPED_TEXT, perplexity_and_bits

    path = path or SHIPPED_TEXT
    if not path.is_file():
        _fail(f"perplexity text {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return {p: perplexity_and_bits(lm, text, p) for p in policies}
    except ValueError as e:
        _fail(str(e))


@app.command()
def quantize(
    model: str = typer.Option("smollm2", "--model", "-m"),
    bits: int = typer.Option(4, "--bits", "-b", help="2..8; for anyprec the widest (8), readable down to --seed-bits."),
    method: str = typer.Option("hqq", "--method", help="rtn, hqq, guided, anyprec or twin (low-rank + residual)."),
    group_size: int = typer.Option(64, "--group-size", "-g"),
    seed_bits: int = typer.Option(3, "--seed-bits", help="anyprec: the smallest width."),
    skip: list[str] = typer.Option(["lm_head"], "--skip", help="Glob of layer names kept as they are; repeat."),
    calib_seqs: int = typer.Option(16, help="guided: calibration sequences the model writes."),
    calib_len: int = typer.Option(256, help="guided: tokens per calibration sequence."),
    grid: str = typer.Option("codebook", help="guided: codebook (non-uniform per output channel) or uniform (per group)."),
    meta_bits: int = typer.Option(0, "--meta-bits", help="Uniform grids: bits of each group's scale and of its zero "
                                  "(0: float16). 8 pays for --group-size 32 at about g64's bytes."),
    qdec_channels: float = typer.Option(0.0, "--qdec-channels", help="QDEC: also keep each layer's residual in host "
                                        "memory and add it on this fraction of each token's input channels, the "
                                        "largest (e.g. 0.02; 0: off)."),
    qdec_bits: int = typer.Option(8, "--qdec-bits", help="QDEC: bits of the residual (4, 8; 16 / 32: float)."),
    rank_bits: float = typer.Option(0.4, "--rank-bits", help="twin: bits a weight spent on the 8-bit low-rank factors."),
    twin_ranks: str = typer.Option("greedy", "--twin-ranks", help="twin: greedy (a rank per layer, by the loss's "
                                   "growth, in the same bytes) or uniform."),
    twin_tune: int = typer.Option(16, "--twin-tune", help="twin: distillation steps that tune all the factors "
                                  "together towards the unquantized model (0: off)."),
    scale_search: bool = typer.Option(False, "--scale-search", help="AWQ: per-channel scales searched on "
                                      "calibration text and folded into the op before each layer, then quantize "
                                      "(Llama-style models; helps hqq/rtn at 3 bits, not twin)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (safetensors + config + tokenizer)."),
) -> None:
    """Quantize a model's weights and save them; `memfit.load_model(OUT)` and `--model OUT` load them."""
    from memfit.weights import WeightQuant, quantize_, save_quantized, weight_bytes

    try:
        cfg = WeightQuant(bits=bits, group_size=group_size, method=method, skip=tuple(skip), seed_bits=seed_bits,
                          calib_seqs=calib_seqs, calib_len=calib_len, grid=grid, meta_bits=meta_bits,
                          qdec_channels=qdec_channels, qdec_bits=qdec_bits, rank_bits=rank_bits,
                          twin_ranks=twin_ranks, twin_tune=twin_tune, scale_search=scale_search)
    except ValueError as e:
        _fail(str(e))
    if out.exists() and any(out.iterdir()) and not (out / "memfit_quant.json").is_file():
        _fail(f"{out} exists and is not a memfit quantized folder: refusing to write into it")
    lm = _load(model)
    before = weight_bytes(lm.model)["total"]
    t0 = time.perf_counter()
    try:
        report = quantize_(lm.model, cfg)
    except ValueError as e:
        _fail(str(e))
    save_quantized(lm.model, lm.tokenizer, out, report)
    after = weight_bytes(lm.model)["total"]
    typer.echo(f"{len(report.layers)} layers quantized ({method}, {bits}-bit) in {time.perf_counter() - t0:.0f} s: "
               f"{_mib(report.orig_nbytes)} -> {_mib(report.nbytes)} ({report.nbytes / report.orig_nbytes:.3f}x); "
               f"whole model {_mib(before)} -> {_mib(after)}; kept: {', '.join(sorted(report.skipped)) or 'none'}"
               + (f"; QDEC residuals in host memory: {_mib(report.host_nbytes)}" if report.host_nbytes else ""))
    typer.echo(f"-> {out}")


@app.command()
def plot(results: Path = typer.Argument(..., help="A results folder (or .jsonl file) from memfit eval / peer_kvpress.")) -> None:
    """Pareto plot (accuracy vs KV bytes per token) and accuracy per task, as PNGs beside the results;
    prints the summary of every record there (memfit's and kvpress's)."""
    from memfit.eval.plots import plot_results
    from memfit.eval.runner import format_summary, load_records, summarize

    if not results.exists():
        _fail(f"{results} does not exist")
    try:
        records = load_records(results)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    folder = results if results.is_dir() else results.parent
    typer.echo(format_summary(summarize(records)))
    for path in plot_results(records, folder):
        typer.echo(f"wrote {path}")


@bench_app.command("kv")
def bench_kv(
    model: str = typer.Option("smollm2", "--model", "-m"),
    lengths: list[int] = typer.Option([1024, 4096], "--length", "-n"),
    policies: list[str] = typer.Option(
        ["none", "kivi(bits=4)", "kivi(bits=2)", "snapkv(keep=0.25)+kivi(bits=2)"], "--policy", "-p"),
    decode_tokens: int = typer.Option(32, help="Decode steps timed per run."),
    out: Path = typer.Option(Path("results/bench_kv.json"), help="JSON output."),
) -> None:
    """Bytes per token and CPU decode tokens/s for several policies and context lengths."""
    from memfit.bench import bench_kv as run

    pols = [_policy(p) for p in policies]
    lm = _load(model)
    rows = run(lm, lengths, pols, decode_tokens)
    _write_json(out, {"model": model, "device": str(lm.device), "rows": rows})
    typer.echo(f"{'policy':<48} {'tokens':>7} {'B/token':>9} {'vs 16-bit':>9} {'prefill s':>9} {'decode tok/s':>12}")
    for r in rows:
        typer.echo(f"{r['policy'][:48]:<48} {r['tokens']:>7} {r['bytes_per_token']:>9.0f} {r['ratio']:>9.3f} "
                   f"{r['prefill_s']:>9.2f} {r['decode_tokens_per_s']:>12.2f}")
    typer.echo(f"wrote {out}")


@bench_app.command("kvzip")
def bench_kvzip_cmd(
    model: str = typer.Option("smollm2", "--model", "-m"),
    lengths: list[int] = typer.Option([1024, 2048, 4096], "--length", "-n"),
    policy: str = typer.Option("kvzip(keep=0.42)+kivi(bits=4,residual=32)", "--policy", "-p",
                               help="A policy with a kvzip eviction."),
    repeats: int = typer.Option(3, help="Timed runs per length; the median is reported."),
    llama8b: bool = typer.Option(False, "--llama8b", help="A random-weight Llama-3.1-8B shape on the GPU instead "
                                 "of --model (scoring with chunk=2048; also times the unfused pass)."),
    layers: int = LAYERS_OPTION,
    out: Path = typer.Option(Path("results/bench_kvzip.json"), help="JSON output."),
) -> None:
    """KVzip's scoring time (the repeat pass and its max attention) against a plain prefill."""
    from memfit.bench import bench_kvzip, bench_kvzip_8b

    if llama8b:
        rows = bench_kvzip_8b(lengths, layers)
        _write_json(out, {"model": "random Llama-3.1-8B shape", "device": "cuda", "rows": rows})
    else:
        pol = _policy(policy)
        if "reconstruction" not in pol.observes():
            _fail(f"policy {policy!r} reads no KVzip scores (no kvzip eviction, no salient tokens)")
        lm = _load(model)
        rows = bench_kvzip(lm, lengths, pol, repeats)
        _write_json(out, {"model": model, "device": str(lm.device), "dtype": str(lm.model.dtype), "rows": rows})
    unfused = "score_unfused_s" in rows[0]
    nd = 3 if llama8b else 2  # GPU seconds are short
    typer.echo(f"{'tokens':>7} {'passes':>6} {'prefill s':>9} {'score s':>8} {'score/prefill':>13}"
               + (f" {'unfused s':>9}" if unfused else ""))
    for r in rows:
        typer.echo(f"{r['tokens']:>7} {r['repeat_passes']:>6} {r['prefill_s']:>9.{nd}f} {r['score_s']:>8.{nd}f} "
                   f"{r['score_vs_prefill']:>13.2f}" + (f" {r['score_unfused_s']:>9.3f}" if unfused else ""))
    typer.echo(f"wrote {out}")


@bench_app.command("reuse")
def bench_reuse_cmd(
    model: str = typer.Option("smollm2", "--model", "-m"),
    samples: int = typer.Option(40, "--samples", "-s", help="Documents-QA samples; 0 skips them."),
    agent_samples: int = typer.Option(10, "--agent-samples", help="Agent samples (3 agents each); 0 skips them."),
    fractions: list[float] = typer.Option([0.0, 0.05, 0.15], "--recompute", "-r",
                                          help="Recompute fractions to compare (0 = naive concatenation); repeat."),
    policy: str = typer.Option("none", "--policy", "-p"),
    doc_tokens: int = typer.Option(1024, help="Tokens a document."),
    tasks: Optional[list[str]] = typer.Option(None, "--task", "-t", help="Also memfit eval's tasks, each context cut "
                                              "into 4 stored documents ('default': the eval's default tasks)."),
    task_samples: int = typer.Option(10, help="Samples a task for --task."),
    task_length: int = typer.Option(4096, help="Context tokens for --task."),
    store: str = typer.Option("mem://", help="Store URL the documents are read from: memory by default, as "
                              "memfit serve keeps them; file://DIR times reads from disk."),
    repeats: int = typer.Option(3, help="Builds of each context (full prefill, assembly); the fastest is timed, "
                                "on both sides: a shared machine's stalls removed."),
    seed: int = typer.Option(0, help="Draws the documents, orders, system prompts and questions (another seed: "
                             "samples the default run never saw)."),
    out: Path = typer.Option(Path("results/bench_reuse.json"), "--out", "-o", help="JSON output."),
) -> None:
    """Stored documents reused anywhere: TTFT and accuracy of a full prefill, naive concatenation
    and selective recompute, for documents QA (4 stored documents in random orders behind new
    system prompts) and agents (one text behind 3 agents' own prefixes)."""
    from memfit.eval.reuse import bench_agents, bench_documents, bench_split_tasks
    from memfit.store import open_store

    from memfit.eval.tasks import DEFAULT_TASKS, TASKS

    tasks = DEFAULT_TASKS if tasks == ["default"] else (tasks or [])
    if any(t not in TASKS for t in tasks):
        _fail(f"unknown task(s) {', '.join(t for t in tasks if t not in TASKS)}; valid: {', '.join(TASKS)}")
    if samples < 0 or agent_samples < 0 or samples + agent_samples + len(tasks) == 0 or not fractions \
            or any(not 0 <= f <= 1 for f in fractions) or task_samples < 1 or repeats < 1:
        _fail("--samples and --agent-samples must be >= 0 (or give --task), --task-samples and --repeats >= 1, "
              "and every --recompute in [0, 1]")
    spec = _policy(policy).spec
    try:
        st = open_store(store)
    except ValueError as e:
        _fail(f"--store: {e}")
    lm = _load(model)
    result = {"model": model, "device": str(lm.device), "dtype": str(lm.model.dtype), "policy": spec,
              "store": store, "repeats": repeats, "seed": seed}
    try:
        if samples:
            result["documents"] = bench_documents(lm, st, samples, fractions=tuple(fractions), policy=spec,
                                                  doc_tokens=doc_tokens, repeats=repeats, seed=seed)
        if agent_samples:
            result["agents"] = bench_agents(lm, st, agent_samples, fractions=tuple(fractions), policy=spec,
                                            repeats=repeats, seed=seed)
        if tasks:
            result["tasks"] = bench_split_tasks(lm, st, tasks, task_length, task_samples,
                                                fractions=tuple(fractions), policy=spec, repeats=repeats, seed=seed)
    except RuntimeError as e:  # the store lost the documents: timing it would be timing full prefills
        _fail(f"--store {store}: {e}")
    _write_json(out, result)
    tables = [("documents QA", result["documents"]["summary"])] if samples else []
    if agent_samples:
        tables += [("agents 2 and 3", result["agents"]["summary"]["agents_2_on"]),
                   ("agent 1 (stores the text)", result["agents"]["summary"]["agent_1"])]
    if tasks:
        tables += [("eval tasks cut into documents", result["tasks"]["summary"])]
        tables += [(f"  {t}", s) for t, s in result["tasks"]["per_task"].items()]
    for title, summary in tables:
        typer.echo(f"\n{title}\n{'variant':<16} {'n':>4} {'accuracy':>9} {'TTFT s':>8} {'speedup':>8} "
                   f"{'recomputed':>10} {'answer KL':>9} {'KV error':>9}")
        for name, s in summary.items():
            err = f"{s['kv_error']:>9.4f}" if "kv_error" in s else ""
            typer.echo(f"{name:<16} {s['n']:>4} {s['accuracy']:>8.1f}% {s['ttft_s']:>8.3f} "
                       f"{s.get('ttft_speedup', 1):>7.2f}x {s['recomputed_tokens']:>10.0f} {s['answer_kl']:>9.4f} "
                       f"{err}")
    typer.echo(f"wrote {out}")


@bench_app.command("tiered")
def bench_tiered_cmd(
    model: str = typer.Option("smollm2", "--model", "-m"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", "-t", help="Tasks for accuracy (default: the eval's)."),
    samples: int = typer.Option(10, "--samples", "-s", help="Samples a task for accuracy; 0 skips accuracy."),
    length: int = typer.Option(4096, help="Context tokens for accuracy."),
    seed: int = typer.Option(0, help="First sample seed of each task (accuracy)."),
    budgets: list[float] = typer.Option([0.25, 0.1], "--device", "-d",
                                        help="Device budgets, fractions of the 16-bit KV; repeat."),
    page: int = typer.Option(32, help="Tokens a page."),
    bits: int = typer.Option(8, help="Bits a stored page element (2, 4, 8; 16: pages as stored)."),
    fetch_caps: Optional[list[float]] = typer.Option(None, "--fetch-cap", help="At most this fraction of the pool "
                                                     "fetched a step (0 < c <= 1, 1: no limit); repeat for "
                                                     "variants. Default: TierConfig's."),
    speed: Optional[list[str]] = typer.Option(None, "--speed", help="BATCHxCONTEXT shapes to time on the GPU with a "
                                              "random-weight Llama-3.1-8B shape, e.g. 1x131072, 8x32768; repeat."),
    throughput: Optional[str] = typer.Option(None, help="REQUESTSxCONTEXT: decode throughput of that many "
                                             "offloaded requests in --fit-gib of GPU memory against the largest "
                                             "batch whose KV fits there, e.g. 32x32768 (GPU)."),
    fit_gib: float = typer.Option(16.0, help="GPU budget for KV in GiB (--throughput)."),
    steps: int = typer.Option(8, help="Decode steps timed (speed)."),
    layers: int = typer.Option(32, help="Layers of the 8B shape (speed)."),
    out: Path = typer.Option(Path("results/bench_tiered.json"), "--out", "-o", help="JSON output."),
) -> None:
    """Decoding from KV offloaded to device / host / disk tiers: accuracy on memfit eval's tasks at
    each device budget against full attention (any device), and with --speed decode step time on
    the GPU for all-on-GPU, fetch-everything offload and memfit's page selection."""
    from memfit.eval.tasks import DEFAULT_TASKS, TASKS

    tasks = tasks or DEFAULT_TASKS
    if any(t not in TASKS for t in tasks):
        _fail(f"unknown task(s) {', '.join(t for t in tasks if t not in TASKS)}; valid: {', '.join(TASKS)}")
    if samples < 0 or not budgets or any(not 0 < b <= 1 for b in budgets) or page < 1:
        _fail("--samples must be >= 0, every --device a fraction in (0, 1], --page >= 1")
    if bits not in (2, 4, 8, 16):
        _fail(f"--bits must be 2, 4, 8 or 16, got {bits}")
    pbits = None if bits == 16 else bits
    if any(not 0 < c <= 1 for c in fetch_caps or []):
        _fail(f"every --fetch-cap must be a fraction in (0, 1], got {fetch_caps}")
    caps = tuple(fetch_caps) if fetch_caps else None
    shapes = []
    for sh in speed or []:
        b, _, n = sh.lower().partition("x")
        if not (b.isdigit() and n.isdigit()) or int(b) < 1 or int(n) < 1:
            _fail(f"bad --speed shape {sh!r}: use BATCHxCONTEXT, e.g. 8x32768")
        shapes.append((int(b), int(n)))
    if shapes:
        _need_cuda("--speed")
    if throughput:
        treq, _, tctx = throughput.lower().partition("x")
        if not (treq.isdigit() and tctx.isdigit()) or int(treq) < 1 or int(tctx) < 1 or fit_gib <= 0:
            _fail(f"bad --throughput {throughput!r} (use REQUESTSxCONTEXT, e.g. 32x32768) or --fit-gib {fit_gib}")
        _need_cuda("--throughput")
    result: dict = {"budgets": budgets, "page": page, "bits": bits, "fetch_caps": list(caps or []), "seed": seed}
    if samples:
        from memfit.eval.tiered import bench_tiered_accuracy

        lm = _load(model)
        result.update(model=model, device=str(lm.device))
        result["accuracy"] = bench_tiered_accuracy(lm, tasks, length, samples, tuple(budgets), page, seed=seed,
                                                   bits=pbits, fetch_caps=caps)
        for name, s in result["accuracy"]["summary"].items():
            frac = f" device {s['device_fraction']:.1%} of the KV" if "device_fraction" in s else ""
            typer.echo(f"{name:<14} n={s['n']:<4} accuracy {s['accuracy']:5.1f}% ({s['delta']:+.1f}){frac}")
        for name, why in result["accuracy"]["refused"].items():
            typer.echo(f"{name:<14} refused: {why}")
    if shapes:
        from memfit.bench import bench_tiered_speed

        result["speed"] = bench_tiered_speed(shapes, tuple(budgets), steps, layers, page=page, bits=pbits,
                                             fetch_caps=caps)
        for r in result["speed"]:
            typer.echo(f"{r['batch']}x{r['context']:<7} {r['variant']:<22} {r['step_ms']:9.2f} ms  "
                       f"{r.get('vs_gpu', float('nan')):.2f}x gpu  {r.get('vs_gpu_graph', float('nan')):.2f}x gpu graph  "
                       f"{r.get('vs_fetch_all', float('nan')):.2f}x fetch-all  "
                       f"device {r['device_bytes'] / 2**30:.2f} GiB")
    if throughput:
        from memfit.bench import bench_tiered_throughput

        try:
            result["throughput"] = bench_tiered_throughput(int(treq), int(tctx), fit_gib, pbits, steps, layers,
                                                           page=page, fetch_caps=caps)
        except ValueError as e:
            _fail(str(e))
        for x in result["throughput"]:
            typer.echo(f"{x['batch']}x{x['context']:<7} {x['variant']:<26} {x['step_ms']:9.2f} ms  "
                       f"{x['tokens_per_s']:8.1f} tokens/s ({x['vs_gpu_tokens_per_s']:.2f}x gpu, "
                       f"{x['vs_gpu_graph_tokens_per_s']:.2f}x gpu graph)  "
                       f"device {x['device_bytes'] / 2**30:.2f} GiB")
    _write_json(out, result)
    typer.echo(f"wrote {out}")


@bench_app.command("weights")
def bench_weights_cmd(
    model: str = typer.Option("smollm2", "--model", "-m"),
    configs: list[str] = typer.Option(["rtn:4", "hqq:4", "rtn:3", "hqq:3", "guided:3", "anyprec:8"], "--config", "-c",
                                      help="METHOD:BITS[:gGROUP][:uniform]; repeat."),
    text: Optional[Path] = typer.Option(None, help="Perplexity text (default: the shipped essay)."),
    out: Path = typer.Option(Path("results/bench_weights.json"), "--out", "-o"),
) -> None:
    """Perplexity and bytes of each weight quantization against the model's 16-bit weights (JSON + plot)."""
    from memfit.bench import bench_weights, parse_weight_config
    from memfit.eval.perplexity import SHIPPED_TEXT
    from memfit.eval.plots import plot_weights

    try:
        cfgs = [parse_weight_config(c) for c in configs]
    except ValueError as e:
        _fail(str(e))
    path = text or SHIPPED_TEXT
    if not path.is_file():
        _fail(f"perplexity text {path} does not exist")
    lm = _load(model)
    rows = bench_weights(lm, cfgs, path.read_text(encoding="utf-8"))
    _write_json(out, {"model": model, "text": str(path), "rows": rows})
    for r in rows:
        typer.echo(f"{r['config']:>14}  ppl {r['perplexity']:8.3f} ({r.get('ppl_vs_ref', 0):+.1%})  "
                   f"linear {r['linear_fraction']:.3f}x  model {_mib(r['model_bytes'])}  quantize {r['quantize_s']:.0f} s")
    typer.echo(f"-> {out}, {plot_weights(rows, out.with_suffix('.png'))}")


@bench_app.command("store")
def bench_store(
    model: str = typer.Option("smollm2", "--model", "-m"),
    lengths: list[int] = typer.Option([1024, 4096, 8000], "--length", "-n"),
    policies: list[str] = typer.Option(["none", "kivi(bits=4)", "snapkv(keep=0.3)+kivi(bits=2)"], "--policy", "-p"),
    store_dir: Path = typer.Option(Path("results/bench_store_data"), help="Folder for the disk tier."),
    redis_url: Optional[str] = typer.Option(None, "--redis", help="redis://host:port/db (skipped if not given)."),
    repeats: int = typer.Option(3, help="Restores timed per tier (the median is kept)."),
    out: Path = typer.Option(Path("results/bench_store.json")),
) -> None:
    """Time to first token restoring a compressed context from each tier vs re-prefilling it."""
    from memfit.bench import bench_store as run

    pols = [_policy(p) for p in policies]
    lm = _load(model)
    rows = run(lm, lengths, pols, store_dir, redis_url, repeats)
    _write_json(out, {"model": model, "device": str(lm.device), "rows": rows})
    from memfit.eval.plots import plot_store

    png = plot_store(rows, out.with_suffix(".png"))
    typer.echo(f"{'policy':<40} {'tokens':>6} {'tier':>7} {'TTFT s':>8} {'speed-up':>9} {'vs plain':>9} {'stored B':>11} "
               f"{'overhead':>8}")
    for r in rows:
        plain = r.get("speedup_vs_plain_prefill")
        typer.echo(f"{r['policy'][:40]:<40} {r['tokens']:>6} {r['tier']:>7} {r['ttft_s']:>8.3f} "
                   f"{r['speedup']:>8.1f}x {plain if plain is None else f'{plain:8.1f}x':>9} {r['stored_bytes']:>11} "
                   f"{100 * r['overhead']:>7.2f}%")
    typer.echo(f"wrote {out} and {png}")


@bench_app.command("attention")
def bench_attention_cmd(
    shapes: list[str] = typer.Option(["1x131072", "8x32768", "1x32768", "1x8192"], "--shape", help="BATCHxTOKENS."),
    policies: list[str] = typer.Option([], "--policy", "-p", help="Also time a layer stored under this policy "
                                       "spec (random KV; evictions scored at random); repeat."),
    out: Path = typer.Option(Path("results/bench_attention.json"), "--out", "-o"),
) -> None:
    """GPU: one decode step of attention, bf16 SDPA vs the packed 4/2-bit kernel (Llama-3.1-8B heads)."""
    import torch

    from memfit.bench import bench_attention

    for spec in policies:
        _policy(spec)  # a bad spec fails before the GPU work
    _need_cuda("bench attention")
    rows = bench_attention([tuple(int(x) for x in s.lower().split("x")) for s in shapes], policies=tuple(policies))
    _write_json(out, {"device": torch.cuda.get_device_name(), "rows": rows})
    typer.echo(f"{'batch':>5} {'tokens':>7} {'sdpa ms':>8} {'4-bit ms':>8} {'x':>5} {'2-bit ms':>8} {'x':>5} {'err4':>8} "
               f"{'err2':>8} {'triton 4/2-bit ms':>18}")
    for r in rows:
        typer.echo(f"{r['batch']:>5} {r['tokens']:>7} {r['sdpa_bf16_ms']:>8.4f} {r['kivi4_ms']:>8.4f} "
                   f"{r['kivi4_speedup']:>5.2f} {r['kivi2_ms']:>8.4f} {r['kivi2_speedup']:>5.2f} "
                   f"{r['kivi4_max_abs_err']:>8.1e} {r['kivi2_max_abs_err']:>8.1e} "
                   f"{r['kivi4_triton_ms']:>8.4f} {r['kivi2_triton_ms']:>8.4f}")
    for r in rows:
        typer.echo(f"{r['batch']}x{r['tokens']}: ragged (KVzip) storage 4/2-bit {r['ragged4_ms']:.4f} / "
                   f"{r['ragged2_ms']:.4f} ms, per byte {r['ragged4_vs_plain_per_byte']:.2f}x / "
                   f"{r['ragged2_vs_plain_per_byte']:.2f}x plain"
                   + (f"; HBM peak fraction sdpa {r['sdpa_bf16_hbm_fraction']:.0%}, 4-bit {r['kivi4_hbm_fraction']:.0%}, "
                      f"2-bit {r['kivi2_hbm_fraction']:.0%}" if "kivi4_hbm_fraction" in r else ""))
    for r in rows:
        for spec, p in r["policies"].items():
            typer.echo(f"{r['batch']}x{r['tokens']} {spec}: " + (p["error"] if "error" in p else
                       f"{p['ms']:.4f} ms ({p['speedup']:.2f}x SDPA) at {p['ratio']:.1f}x fewer bytes"
                       + (f", {p['hbm_fraction']:.0%} of HBM peak" if "hbm_fraction" in p else "")))
    for r in rows:
        pre = f", causal SDPA prefill of the same tokens {r['prefill_attention_ms']:.2f} ms" if "prefill_attention_ms" in r else ""
        typer.echo(f"{r['batch']}x{r['tokens']}: 4-bit quantize-and-pack of one layer's K+V {r['pack4_ms']:.3f} ms "
                   f"(torch {r['pack4_torch_ms']:.3f} ms){pre}")
    typer.echo(f"wrote {out}")


@bench_app.command("weight-decode")
def bench_weight_decode_cmd(
    batch: int = typer.Option(1),
    bits: list[int] = typer.Option([4], "--bits", "-b", help="Weight width; repeat to time several on one bf16 baseline."),
    group_size: int = typer.Option(64, "--group-size", "-g"),
    method: str = typer.Option("hqq"),
    kernel: str = typer.Option(None, "--kernel", help="'tiles' (or 'tiles-a8', int8 input): memfit's tile-layout "
                               "GEMV at every width (the default), 'tinygemm': torch's int4 kernel at 4 bits, "
                               "'planes': the bit-plane GEMV."),
    layers: int = LAYERS_OPTION,
    compile: bool = typer.Option(False, "--compile", help="torch.compile the step before capturing it."),
    lm_head: bool = typer.Option(False, "--lm-head", help="Quantize the output layer too (torchao's int4 "
                                 "weight-only does: every Linear); by default it stays bf16."),
    meta_bits: int = typer.Option(0, "--meta-bits", help="Scale and zero stored in this many bits (0: float16)."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="Run q/k/v and gate/up as one stacked layer each "
                              "(as a quantized folder loads on CUDA)."),
    attention: str = typer.Option("memfit", "--attention", help="'memfit': the step as memfit's static decode runs "
                                  "it (unmasked GQA SDPA, as bench decode's 16-bit graph); 'sdpa': transformers' "
                                  "masked SDPA on a StaticCache not yet full."),
    qdec_channels: float = typer.Option(0.0, "--qdec-channels", help="Also time each width with QDEC on this "
                                        "fraction of input channels (needs --no-fuse; QDEC layers do not stack)."),
    qdec_bits: int = typer.Option(8, "--qdec-bits", help="QDEC: bits of the residual in host memory."),
    twin_rank_bits: float = typer.Option(0.0, "--twin-rank-bits", help="Also time each width with twin's 8-bit "
                                         "low-rank factors on every layer, of the rank that spends this many bits a "
                                         "weight (random values: timing only)."),
    twin_epilogue: list[str] = typer.Option(["kernel"], "--twin-epilogue", help="Where twin's (x R^T) L^T is "
                                            "added: 'kernel' (in the GEMV's launch), 'torch' (after it, from the u "
                                            "the launch hands back), 'auto' (torch while compiling); repeat to time "
                                            "several."),
    out: Path = typer.Option(Path("results/bench_weight_decode.json"), "--out", "-o"),
) -> None:
    """GPU: decode step time, random-weight Llama-3.1-8B shape, bf16 weights vs quantized weights."""
    from memfit.bench import bench_weight_decode

    _need_cuda("bench weight-decode")
    from memfit.weights.linear import PREFER, TWIN_EPILOGUES

    if kernel is not None and kernel not in PREFER:  # checked before an 8B model is built
        raise typer.BadParameter(f"unknown kernel {kernel!r}; use one of {PREFER}", param_hint="--kernel")
    if attention not in ("memfit", "sdpa"):
        raise typer.BadParameter(f"unknown attention {attention!r}; use memfit or sdpa", param_hint="--attention")
    if qdec_channels:  # checked before an 8B model is built
        from memfit.weights import qdec

        if fuse:
            raise typer.BadParameter("QDEC layers do not stack: add --no-fuse", param_hint="--qdec-channels")
        try:
            qdec.check(qdec_bits, qdec_channels)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--qdec-channels / --qdec-bits") from None
    if twin_rank_bits and not 0 < twin_rank_bits < 8:
        raise typer.BadParameter(f"the factors' bits a weight must be in (0, 8); got {twin_rank_bits}",
                                 param_hint="--twin-rank-bits")
    if bad := [e for e in twin_epilogue if e not in TWIN_EPILOGUES]:
        raise typer.BadParameter(f"unknown twin epilogue {bad[0]!r}; use one of {TWIN_EPILOGUES}",
                                 param_hint="--twin-epilogue")
    r = bench_weight_decode(batch, bits=tuple(bits), group_size=group_size, method=method, layers=layers,
                            compile=compile, lm_head=lm_head, meta_bits=meta_bits, kernel=kernel, fuse=fuse,
                            attention=attention, qdec_channels=qdec_channels, qdec_bits=qdec_bits,
                            twin_rank_bits=twin_rank_bits, twin_epilogues=tuple(twin_epilogue))
    _write_json(out, r)
    stacked = f", stacked {r['bf16_fused_ms']:.3f} ms" if "bf16_fused_ms" in r else ""
    typer.echo(f"bf16 {r['bf16_ms']:.3f} ms{stacked} ({r['bf16_mode']}), roofline {r['bf16_roofline_ms']:.3f} ms")
    for w in r["widths"]:
        vs = f" ({w['speedup_vs_fused_bf16']:.2f}x stacked bf16)" if "speedup_vs_fused_bf16" in w else ""
        typer.echo(f"{w['bits']}-bit {w['quant_ms']:.3f} ms ({w['quant_mode']}, {w['kernels']}): {w['speedup']:.2f}x bf16{vs}; "
                   f"roofline {w['roofline_ms']:.3f} ms ({w['of_roofline']:.0%}); weights {r['bf16_weight_bytes'] / 2**30:.2f}"
                   f" -> {w['quant_weight_bytes'] / 2**30:.2f} GiB stored, {w['quant_resident_bytes'] / 2**30:.2f} GiB resident")
        if "qdec_ms" in w:
            typer.echo(f"  + QDEC {w['qdec_channels']:.1%} of channels, {w['qdec_bits']}-bit residual "
                       f"({w['qdec_fetch_bytes'] / 2**20:.1f} MiB a token from host memory): {w['qdec_ms']:.3f} ms "
                       f"overlapped ({w['qdec_added']:+.1%}), {w['qdec_inline_ms']:.3f} ms inline "
                       f"({w['qdec_inline_added']:+.1%})")
        if "twin_ms" in w:
            typer.echo(f"  + twin factors at {w['twin_rank_bits']} bits a weight (ranks {w['twin_ranks']}): "
                       f"{w['twin_ms']:.3f} ms ({w['twin_vs_plain']:.3f}x the plain width; {w['twin_kernels']}; "
                       f"epilogue {w['twin_epilogue']}), roofline {w['twin_roofline_ms']:.3f} ms "
                       f"({w['twin_of_roofline']:.0%})")
            for e, ms in w.get("twin_epilogue_ms", {}).items():
                typer.echo(f"    epilogue {e}: {ms:.3f} ms ({ms / w['quant_ms']:.3f}x the plain width)")
    typer.echo(f"wrote {out}")


@bench_app.command("decode")
def bench_decode_cmd(
    batch: int = typer.Option(8),
    context: int = typer.Option(32768),
    policies: list[str] = typer.Option(["none", "kivi(bits=4)"], "--policy", "-p"),
    steps: int = typer.Option(32),
    layers: int = LAYERS_OPTION,
    graph: bool = typer.Option(True, "--graph/--no-graph",
                               help="Also time each cache as CUDA graphs ('none' as a 16-bit StaticCache)."),
    compile: bool = typer.Option(False, "--compile", help="Also time each graph torch.compile'd before capture "
                                 "(both sides)."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="Stack the model's q/k/v and gate/up projections "
                              "(one GEMM each, on every side, the 16-bit baseline included)."),
    out: Path = typer.Option(Path("results/bench_decode.json"), "--out", "-o"),
) -> None:
    """GPU: decode step time and peak memory, random-weight Llama-3.1-8B shape, DynamicCache vs memfit."""
    import torch

    from memfit.bench import bench_decode

    _need_cuda("bench decode")
    rows = bench_decode(batch, context, tuple(policies), steps, layers=layers, graph=graph, compile=compile,
                        fuse=fuse)
    _write_json(out, {"device": torch.cuda.get_device_name(), "rows": rows})
    for r in rows:
        graph = (f"  CUDA graph {r['graph_step_ms']:8.2f} ms ({r['graph_speedup']:.2f}x"
                 + (f", {r['graph_speedup_vs_static']:.2f}x graph to graph)" if "graph_speedup_vs_static" in r else ")")
                 if "graph_step_ms" in r else "")
        if "compiled_step_ms" in r:
            graph += f"  compiled {r['compiled_step_ms']:8.2f} ms"
            if "compiled_speedup_vs_static" in r:
                graph += (f" ({r['compiled_speedup_vs_static']:.2f}x the 16-bit graph, "
                          f"{r['compiled_speedup_vs_compiled']:.2f}x compiled)")
        roof = f"  roofline {r['roofline_ms']:.2f} ms ({r['step_vs_roofline']:.2f}x)" if "roofline_ms" in r else ""
        typer.echo(f"{r['policy']:<20} step {r['decode_step_ms']:8.2f} ms ({r['speedup']:.2f}x){graph}{roof}  KV "
                   f"{r['kv_bytes'] / 2**30:6.2f} GiB  decode peak {r['decode_peak_bytes'] / 2**30:6.2f} GiB  "
                   f"prefill {r['prefill_s']:.1f} s")
    typer.echo(f"wrote {out}")


@app.command()
def plan(
    model: str = typer.Option("smollm2", "--model", "-m", help="A HF config.json (or its folder), a model folder, "
                              "a .gguf file or smollm2: only the config is read, no weights."),
    context_tokens: list[int] = typer.Option([131072], "--context-tokens", "-n", help="Context length; repeat."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", "-g", help="Memory to fit, e.g. 24GiB."),
    weight_bits: float = typer.Option(16, help="Bits per weight (16 for bf16; 4.5 for 4-bit g64 with scales)."),
    batch: int = typer.Option(1, help="Sequences held at once."),
    policies: Optional[list[str]] = typer.Option(None, "--policy", "-p", help="Policies to list (default: a ladder)."),
) -> None:
    """What fits: weights + KV cache per policy, and the policy the planner picks for the memory left."""
    from memfit.kv.plan import KVShape, policy_nbytes
    from memfit.kv.plan import plan as plan_policy
    from memfit.models import config_only, count_parameters
    from memfit.units import human_bytes, parse_bytes

    try:
        cfg = config_only(model)
        limit = parse_bytes(gpu_memory) if gpu_memory else None
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    shape = KVShape.from_config(text)
    params = count_parameters(cfg)
    weights = int(params * weight_bits / 8)
    specs = policies or ["none", "kivi(bits=8)", "kivi(bits=4)", "kivi(bits=2)", "kvzip(keep=0.5)+kivi(bits=4)",
                         "kvzip(keep=0.25)+kivi(bits=4)", "kvzip(keep=0.1)+kivi(bits=4)"]
    pols = [_policy(p) for p in specs]
    typer.echo(f"{model}: {params / 1e9:.3f} B parameters, weights {human_bytes(weights)} at {weight_bits:g} bits; "
               f"16-bit KV {shape.full_bytes_per_token} bytes/token ({shape.num_layers} layers x "
               f"{shape.num_kv_heads} KV heads x {shape.head_dim}); activations not counted")
    for n in context_tokens:
        typer.echo(f"\n{n} context tokens x batch {batch}")
        typer.echo(f"{'policy':<46} {'KV':>12} {'weights + KV':>14} {'compr.':>7}" + ("  fits" if limit else ""))
        for p in pols:
            kv = batch * policy_nbytes(p, n, shape)
            fits = ("   yes" if weights + kv <= limit else "    no") if limit else ""
            typer.echo(f"{p.spec[:46]:<46} {human_bytes(kv):>12} {human_bytes(weights + kv):>14} "
                       f"{batch * n * shape.full_bytes_per_token / kv:>6.1f}x{fits}")
        if limit:
            room = (limit - weights) // batch
            if room <= 0:
                typer.echo(f"the weights alone ({human_bytes(weights)}) exceed {gpu_memory}")
                continue
            try:
                picked, b = plan_policy(room, n, shape, packed=True)  # GPU memory: what the decode kernel reads
                typer.echo(f"planner: {picked.spec} ({human_bytes(batch * b)} of KV, {human_bytes(weights + batch * b)} "
                           f"in all, within {gpu_memory})")
            except ValueError as e:
                typer.echo(f"planner: nothing fits: {e}")


@bench_app.command("serve")
def bench_serve_cmd(
    model: str = typer.Option("smollm2", "--model", "-m"),
    policy: str = typer.Option("kivi(bits=4)", "--policy", "-p", help="Policy of the stored context."),
    tokens: int = typer.Option(4096, help="Context length in tokens."),
    questions: int = typer.Option(8, help="Questions asked each way."),
    chats: int = typer.Option(40, help="Plain short chats."),
    clients: int = typer.Option(4, help="Concurrent clients for the plain chats."),
    out: Path = typer.Option(Path("results/bench_serve.json")),
) -> None:
    """Against a live `memfit serve`: plain chats (req/s, p50/p95), and time to first token for
    questions on a stored context vs re-sending the whole context each time."""
    from memfit.bench import bench_serve

    _policy(policy)
    res = bench_serve(model, policy, tokens, questions, chats, clients)
    _write_json(out, res)
    typer.echo(f"{'case':<34} {'n':>4} {'req/s':>7} {'p50 TTFT s':>10} {'p95 TTFT s':>10} {'p50 total s':>11}")
    for name, r in res["cases"].items():
        typer.echo(f"{name:<34} {r['requests']:>4} {r['requests_per_s']:>7.2f} {r['ttft_p50_s']:>10.3f} "
                   f"{r['ttft_p95_s']:>10.3f} {r['latency_p50_s']:>11.3f}")
    typer.echo(f"stored context vs re-sent: p50 TTFT {res['ttft_speedup']:.1f}x lower; wrote {out}")


@bench_app.command("chaos")
def bench_chaos_cmd(
    model: str = typer.Option("smollm2", "--model", "-m"),
    minutes: float = typer.Option(2.0, help="How long the clients run (after the replicas are up)."),
    replicas: int = typer.Option(3),
    clients: int = typer.Option(8),
    fault_every: float = typer.Option(20.0, help="Seconds between injected faults."),
    hold: Optional[float] = typer.Option(None, help="Seconds each fault lasts before it is undone (default: half "
                                         "of --fault-every)."),
    faults: list[str] = typer.Option(["kill_replica", "redis_restart", "redis_wipe", "dropped_stream", "disk_full",
                                      "disk_read_only", "disk_slow"], "--fault",
                                     help="Fault kinds, injected in turn; repeat. disk_full and disk_read_only "
                                     "mount a tmpfs per disk tier (root)."),
    policy: str = typer.Option("kivi(bits=4)", "--policy", "-p"),
    out: Path = typer.Option(Path("results/chaos"), help="Folder for history.jsonl, chaos.json and the logs."),
) -> None:
    """Replicas sharing a real redis-server, concurrent clients checking every answer against the
    library, faults injected meanwhile; the history is checked (0 violations: the run passed)."""
    from memfit.serve.chaos import run_chaos

    _policy(policy)
    try:
        res = run_chaos(model, out, minutes * 60, replicas, clients, fault_every, tuple(faults), policy, hold=hold)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(json.dumps({k: res[k] for k in ("operations", "faults", "by_op", "violations", "chat_latency")},
                          indent=1))
    typer.echo(f"{sum(res['violations'].values())} violations; wrote {out / 'chaos.json'}")
    if res["violations"]:
        raise typer.Exit(1)


@app.command()
def serve(
    model: str = typer.Option("smollm2", "--model", "-m"),
    policy: str = typer.Option("kivi(bits=4)", "--policy", "-p", help="Policy for stored contexts (POST /v1/contexts); "
                               "plain prompts use its quantizer only, so that their prefixes can be reused."),
    store: list[str] = typer.Option(["mem://?max_bytes=2GiB"], "--store", "-s", help="Store URL(s), fastest first; "
                                    "replicas that share a redis:// store share contexts."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MEMFIT_API_KEY", help="Require Bearer KEY."),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="JSON file of API keys, each a tenant's (with an "
                                            "optional byte quota) or an admin's; tenants never see each other's "
                                            "contexts (see docs/server.md)."),
    max_queue: int = typer.Option(16, help="Requests waiting or running before 429."),
    max_tokens: int = typer.Option(1024, help="Largest max_tokens accepted (and the default where a request sets none)."),
    max_context_tokens: Optional[int] = typer.Option(None, help="Longest prompt/context (default: the model's)."),
    max_body_mb: float = typer.Option(4.0, help="Largest request body, MiB."),
    reuse_prompts: bool = typer.Option(True, help="Store long plain prompts and reuse their prefixes."),
    served_model_name: Optional[str] = typer.Option(None, help="The model id clients send and /v1/models lists "
                                                    "(default: the model's name); other ids get 404."),
    request_timeout: float = typer.Option(300.0, help="Seconds of generation after which an answer is cut short "
                                          "(finish_reason 'length'), freeing the model for the others."),
) -> None:
    """OpenAI-compatible HTTP server (chat/completions, streaming) with stored compressed contexts."""
    import uvicorn

    from memfit.serve import ServeConfig, create_app
    from memfit.store import open_store

    from memfit.serve.tenants import load_api_keys

    _policy(policy)
    if api_key and api_keys:
        _fail("give --api-key (one key, one user) or --api-keys FILE (tenants), not both")
    try:
        keys = load_api_keys(api_keys) if api_keys else None
    except ValueError as e:
        _fail(str(e))
    try:
        st = open_store(list(store))
    except ValueError as e:
        _fail(str(e))
    for tier in st.tiers:  # a restart reads its disk tiers back: a killed writer's leftovers go, entries are checked
        if hasattr(tier, "recover"):
            typer.echo(f"store {tier.name} tier {tier.root}: {tier.recover()}", err=True)
    lm = _load(model)
    typer.echo(f"warming up ({policy})...", err=True)  # the kernels compile now, not in the first request
    typer.echo(f"warm in {lm.warmup(policy):.1f} s; serving on http://{host}:{port}", err=True)
    limit = max_context_tokens or getattr(lm.model.config, "max_position_embeddings", 8192)
    cfg = ServeConfig(policy=policy, api_key=api_key, api_keys=keys, max_body_bytes=int(max_body_mb * 2**20),
                      max_context_tokens=limit, max_tokens=max_tokens, max_queue=max_queue,
                      model_name=served_model_name or (Path(model).name if Path(model).exists() else model),
                      reuse_prompts=reuse_prompts, request_timeout=request_timeout)
    uvicorn.run(create_app(lm, st, cfg), host=host, port=port, log_level="warning")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
