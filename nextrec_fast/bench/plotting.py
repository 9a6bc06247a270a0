"""Bar chart of ``nextrec-fast bench`` results: speed-up over the reference per model and mode."""
from __future__ import annotations

import json
import os


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib "
                          "(or pip install --no-build-isolation 'nextrec-fast[plot]')") from exc
    matplotlib.use("Agg")  # files only: no display needed, none assumed
    import matplotlib.pyplot as plt
    return plt


def baseline_name(result_or_rows) -> str:
    """What the speed-ups of a bench result are over, in the words of the bench table's legend."""
    rows = result_or_rows["rows"] if isinstance(result_or_rows, dict) else result_or_rows
    if rows and all(r["mode"].startswith("nextrec_fit") for r in rows):
        return "plain nextrec (its own fit)"
    baselines = {r.get("baseline", "reference") for r in rows}
    if len(baselines) == 1 and baselines != {"reference"}:
        return f"{baselines.pop()} (its own model)"
    return "the reference (nextrec's math re-implemented)"


def plot_title(environment: dict, baseline: str = "the reference (nextrec's math re-implemented)") -> str:
    env = environment
    batch = env.get("batch")
    return (f"nextrec_fast speed-up over {baseline}, medians\n"
            f"{env.get('device', '?')} ({env.get('device_name', '?')}) | torch {env.get('torch', '?')} | "
            f"triton {env.get('triton') or '-'} | {env.get('threads', '?')} threads | config {env.get('config', '?')}"
            + (f" | batch {batch}" if batch else ""))


def plot_speedups(result: dict, path: str) -> str:
    """Draw ``result`` (the dict of ``nextrec-fast bench --json``) as a PNG at ``path``."""
    plt = _pyplot()
    rows = result["rows"]
    if not rows:
        raise ValueError("no rows to plot")
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    speedup = {(r["model"], r["mode"]): r["speedup"] for r in rows}
    batches = sorted({r["batch"] for r in rows})
    environment = dict(result.get("environment", {}))
    environment.setdefault("batch", ", ".join(str(b) for b in batches))

    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 1.8 * len(models) * max(1, len(modes) / 2)), 4.8))
    for m, mode in enumerate(modes):
        xs = [i + (m - (len(modes) - 1) / 2) * width for i in range(len(models))]
        values = [speedup.get((model, mode), 0.0) for model in models]
        bars = ax.bar(xs, values, width * 0.92, label=mode.replace("_", " "))
        ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "" for v in values], fontsize=8, padding=2)
    baseline = baseline_name(rows)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")  # parity with the baseline
    ax.set_xticks(range(len(models)), [m.upper() for m in models])
    ax.set_ylabel(f"speed-up over {baseline.split(' (')[0]} (x, higher is better)")
    ax.set_ylim(0, max(speedup.values()) * 1.18)
    # Legend under the axis: never on top of a bar, whichever model is tallest.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(modes), frameon=False)
    ax.set_title(plot_title(environment, baseline), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_demo(result: dict, path: str) -> str:
    """Test AUC against training wall-clock time (``nextrec-fast demo --json``'s dict): one panel
    per model and task, one line per variant, a point per epoch (the first at 0 s: untrained)."""
    from nextrec_fast.bench.demo import VARIANTS
    plt = _pyplot()
    models = result["models"]
    tasks = max(len(next(iter(m["runs"].values()))["final"]) for m in models.values())
    fig, axes = plt.subplots(len(models), tasks, figsize=(5.2 * tasks, 3.4 * len(models)), squeeze=False)
    for row, (kind, entry) in enumerate(models.items()):
        for variant, run in entry["runs"].items():
            for col, task in enumerate(run["final"]):
                xs = [t for t, _ in run["curve"]]
                ys = [m[task]["auc"] for _, m in run["curve"]]
                axes[row][col].plot(xs, ys, marker="o", markersize=3, label=VARIANTS.get(variant, variant))
                axes[row][col].set_title(f"{kind.upper()}: {task}", fontsize=9)
                axes[row][col].set_xlabel("training time (s)", fontsize=8)
                axes[row][col].set_ylabel("test AUC", fontsize=8)
                axes[row][col].grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    env = result["environment"]
    fig.suptitle(f"MovieLens-100K: test AUC vs training time, nextrec {env.get('nextrec', '?')}, batch "
                 f"{env.get('batch_size')}, {env.get('threads')} threads ({env.get('device_name', '?')})", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * (len(labels) > 3), 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_json(json_path: str, out_path: str) -> str:
    """Redraw a ``bench --json`` (speed-up bars) or ``demo --json`` (AUC curves) file."""
    with open(json_path) as fh:
        result = json.load(fh)
    return plot_demo(result, out_path) if "models" in result else plot_speedups(result, out_path)
