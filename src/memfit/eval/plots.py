"""PNG plots of eval results: a Pareto view (accuracy vs KV bytes per token) and accuracy per task."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from memfit.eval.runner import summarize  # noqa: E402


def _label(row: dict) -> str:
    fam = row["family"]
    return fam if row["source"] == "memfit" or fam.startswith(row["source"] + ":") else f"{row['source']}:{fam}"


def plot_pareto(rows: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(9, 6))
    lines: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        lines[_label(r)].append(r)
    for label, pts in sorted(lines.items()):
        pts.sort(key=lambda r: r["bytes_per_token"])
        dashed = not label.startswith(("none", "kivi", "snapkv", "streaming")) or ":" in label
        ax.plot([p["bytes_per_token"] / 1024 for p in pts], [100 * p["accuracy"] for p in pts],
                marker="s" if ":" in label else "o", linestyle="--" if dashed else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache size (KiB per context token, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="method family", fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_task(rows: list[dict], path: Path, title: str) -> Path:
    tasks = sorted({t for r in rows for t in r["per_task"]})
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks) + 3), 5.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(tasks))]
        label = r["policy"] if r["source"] == "memfit" or r["policy"].startswith(r["source"] + ":") \
            else f"{r['source']}:{r['policy']}"
        ax.bar(xs, [100 * r["per_task"].get(t, 0.0) for t in tasks], width, label=label[:55],
               color=plt.cm.tab20(i % 20))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(records: list[dict], folder: Path) -> list[Path]:
    rows = summarize(records)
    model = records[0].get("model", "model") if records else "model"
    counts = {src: len({(r["task"], r["length"], r["seed"]) for r in records if r.get("source", "memfit") == src})
              for src in sorted({r.get("source", "memfit") for r in records})}
    n = ", ".join(f"{src}: {c} samples" for src, c in counts.items())
    return [
        plot_pareto(rows, folder / "pareto.png", f"Accuracy per KV byte — {model} ({n})"),
        plot_per_task(rows, folder / "per_task.png", f"Accuracy per task (task@context tokens) — {model}"),
    ]


def plot_store(rows: list[dict], path: Path) -> Path:
    """Time to first token per tier vs re-prefill, one group of bars per (policy, length)."""
    groups = sorted({(r["policy"], r["tokens"]) for r in rows}, key=lambda g: (g[1], g[0]))
    tiers = list(dict.fromkeys(r["tier"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups) + 2), 5.5))
    width = 0.8 / len(tiers)
    for i, tier in enumerate(tiers):
        ys = [next((r["ttft_s"] * 1000 for r in rows if (r["policy"], r["tokens"]) == g and r["tier"] == tier), 0)
              for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=tier)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{p.split('(')[0] if '+' not in p else p.split('(')[0] + '+…'}\n{n} tok" for p, n in groups],
                       fontsize=8)
    ax.set_ylabel("time to first token (ms, log scale)")
    ax.set_title("Restoring a compressed context vs re-reading it")
    ax.legend(title="source")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(rows: list[dict], path: Path) -> Path:
    """Perplexity against bytes of the quantized linear layers, one series per method."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["linear_fraction"] * (r["bits"] / r.get("stored_bits", r["bits"])))
        xs = [r["linear_fraction"] * r["bits"] / r.get("stored_bits", r["bits"]) for r in rs]  # bytes read at that width
        ax.plot(xs, [r["perplexity"] for r in rs], "o-" if len(rs) > 1 else "o", label=method)
        for x, r in zip(xs, rs):
            ax.annotate(f"{r['bits']}b", (x, r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bytes of the linear layers (fraction of 16-bit)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_demo(records: list[dict], path: Path, title: str) -> Path:
    """Correct answers against KV size, one labelled point per demo row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in records:
        planned = r["row"].startswith("budget=")
        ax.scatter(r["kv_bytes"] / 2**20, r["correct"], s=60, marker="*" if planned else "o",
                   color="tab:green" if planned else "tab:blue", zorder=3)
        # planned rows are named by their budget (the policy the planner picked is in demo.json)
        label = r["row"] if planned else r["short_policy"]
        ax.annotate(f"{label} ({r['compression']:.1f}x)", (r["kv_bytes"] / 2**20, r["correct"]), fontsize=7,
                    xytext=(4, -11 if planned else 5), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache (MiB, log scale)")
    ax.set_ylabel(f"correct answers (of {records[0]['questions']})")
    ax.set_ylim(-0.3, records[0]["questions"] + 0.6)
    ax.set_title(title + " (stars: the planner's pick for a budget)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
