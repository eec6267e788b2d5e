"""``fltac report``: run folders in, ``report.md`` + ``report.html`` + PNG plots out.

Reads only what runs write (``config.json``, ``summary.json``, ``metrics.jsonl``, ``tasks.json``,
``cluster_assignments.jsonl``, ``adapters/*.safetensors``): no model is built, no torch module runs.
Plots (matplotlib, Agg backend):

- ``accuracy_per_round.png``: per-task test accuracy of the serving adapter per round, one panel per run,
  with each task's majority-class accuracy (always predicting its most frequent test label) dotted;
- ``accuracy_vs_uplink.png``: mean accuracy against cumulative uplink bytes, one line per run;
- ``clustering_accuracy.png``: FL-TAC's clustering accuracy per round, one line per FL-TAC run;
- ``confusion_<run>.png``: the final round's task-by-cluster counts of submitted adapters;
- ``projection_<run>.png``: a 2-D PCA of the adapters clients submitted in the first and last round,
  as the server's clustering saw them (computed by the run's own strategy from its ``server`` config),
  coloured by the true task, marked by the cluster they were put in.

The tables compare the runs from their ``summary.json``: the means, then each task's accuracy beside its
majority-class accuracy.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fltac import io
from fltac.config import ConfigError, from_dict
from fltac.wire import Submission, is_lora_key

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
DPI = 100
LABELS = {"accuracy": "accuracy", "lm_loss": "LM loss"}  # axis words per Run.metric


class ReportError(ConfigError):
    """A folder that is not a finished run, with the folder and what is missing."""


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    clusters: list[dict]
    task_info: list[dict]  # tasks.json: per task name, labels, majority_accuracy ([] for runs that lack it)

    @property
    def method(self) -> str:
        return self.summary.get("method", self.config.get("method", "?"))

    @property
    def metric(self) -> str:
        """The evaluation figure its eval lines and summary hold: 'accuracy', or 'lm_loss' for a causal LM."""
        return "accuracy" if "per_task_accuracy" in self.summary else "lm_loss"

    @property
    def tasks(self) -> list[str]:
        return list(self.summary.get("tasks") or dict.fromkeys(m["task"] for m in self.evals()))

    def evals(self) -> list[dict]:
        """The evaluation records with a score (a task that had not started yet, data.task_start_round, has none)."""
        return [m for m in self.metrics if m.get("phase") == "eval" and m.get(self.metric) is not None]

    def rounds(self) -> list[dict]:
        return [m for m in self.metrics if m.get("phase") == "round"]


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    missing = [f for f in ("config.json", "summary.json", "metrics.jsonl") if not (path / f).is_file()]
    if missing:
        raise ReportError(f"{path} is not a finished run: it lacks {', '.join(missing)}")
    return Run(name or path.name, path, io.read_json(path / "config.json"), io.read_json(path / "summary.json"),
               io.read_jsonl(path / "metrics.jsonl"), io.read_jsonl(path / "cluster_assignments.jsonl"),
               io.read_json(path / "tasks.json") if (path / "tasks.json").is_file() else [])


def unique_names(paths: list[Path]) -> list[str]:
    """Folder names, made unique by prefixing the parent's name (then an index) where two collide."""
    names = [p.name for p in paths]
    for i, p in enumerate(paths):
        if names.count(p.name) > 1:
            names[i] = f"{p.parent.name}_{p.name}"
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---- figures from the files ----------------------------------------------------------------------

def accuracy_by_round(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """``{task: (rounds, accuracies)}`` of the serving adapter, at every evaluated round (LM losses for a causal LM)."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for m in run.evals():
        out[m["task"]][0].append(m["round"])
        out[m["task"]][1].append(m[run.metric])
    return dict(out)


def majority_accuracy(run: Run) -> dict[str, float]:
    """``{task: accuracy of always predicting its most frequent label}`` on the run's test sample (tasks.json);
    empty for a causal-LM run or a run made before fltac recorded it."""
    return {t["name"]: t["majority_accuracy"] for t in run.task_info if "majority_accuracy" in t}


def accuracy_vs_uplink(run: Run) -> tuple[list[int], list[float]]:
    """(cumulative uplink bytes after each evaluated round, mean accuracy (causal LM: LM loss) at that round)."""
    cumulative, total = {}, 0
    for m in sorted(run.rounds(), key=lambda m: m["round"]):
        total += m["uplink_bytes"]
        cumulative[m["round"]] = total
    by_round: dict[int, list[float]] = defaultdict(list)
    for m in run.evals():
        by_round[m["round"]].append(m[run.metric])
    rounds = sorted(r for r in by_round if r in cumulative)
    return [cumulative[r] for r in rounds], [float(np.mean(by_round[r])) for r in rounds]


def clustering_by_round(run: Run) -> tuple[list[int], list[float]]:
    rows = sorted(run.clusters, key=lambda c: c["round"])
    return [c["round"] for c in rows], [c["clustering_accuracy"] for c in rows]


def confusion(run: Run, round_: int | None = None) -> tuple[list[str], list[int], np.ndarray, int]:
    """(tasks, clusters, counts[task, cluster] of submitted adapters, round): the last round by default."""
    rec = run.clusters[-1] if round_ is None else next(c for c in run.clusters if c["round"] == round_)
    tasks = [t for t in run.tasks if any(a["task"] == t for a in rec["assignments"])]
    clusters = sorted({a["cluster"] for a in rec["assignments"]})
    counts = np.zeros((len(tasks), len(clusters)), dtype=np.int64)
    for a in rec["assignments"]:
        counts[tasks.index(a["task"]), clusters.index(a["cluster"])] += 1
    return tasks, clusters, counts, rec["round"]


def submission_rounds(run: Run) -> list[int]:
    files = (run.path / "adapters").glob("submissions_round_*.safetensors")
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in files)


def _slot_states(run: Run, round_: int) -> dict[int, dict]:
    slots: dict[int, dict] = defaultdict(dict)
    for name, t in io.load_tensors(run.path / "adapters" / f"round_{round_}.safetensors").items():
        slot, key = name.split("/", 1)
        slots[int(slot.removeprefix("slot"))][key] = t
    return slots


def kmeans_features(run: Run, round_: int) -> tuple[np.ndarray, list[str], list[int]]:
    """The vectors the server clustered in ``round_`` (K-means or spectral), with each one's true task and assigned
    cluster.

    Computed by the run's own strategy (:meth:`fltac.server.strategies.FLTAC.features`, built from the run's
    config with the same factory), from the saved submissions and the adapters they started from: the same
    tensors, weights or update, normalisation and ``kmeans_dims`` projection as the server used.
    """
    from fltac.server.strategies import make_fltac

    cfg = from_dict(run.config)
    tensors = io.load_tensors(run.path / "adapters" / f"submissions_round_{round_}.safetensors")
    meta = io.read_json(run.path / "adapters" / f"submissions_round_{round_}.json")
    starts = {(c, k): s for c, k, s in meta["starts"]}
    initial = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("initial/")}
    states: dict[tuple[int, str], dict] = defaultdict(dict)
    for name, t in tensors.items():
        if not name.startswith("initial/"):
            client, key, tensor = name.split("/", 2)
            states[(int(client), key)][tensor] = t
    order = meta.get("tensor_order") or list(next(iter(states.values())))  # older runs: the file's order
    previous = _slot_states(run, round_ - 1) if any(s >= 0 for s in starts.values()) else {}
    record = next(c for c in run.clusters if c["round"] == round_)
    subs = []
    for a in record["assignments"]:
        slot = starts[(a["client"], a["key"])]
        state = states[(a["client"], a["key"])]
        subs.append(Submission(a["client"], a["key"], {k: state[k] for k in order}, a["n"],
                               initial if slot < 0 else previous[slot]))
    strategy = make_fltac(cfg, subs[0].state, len(run.tasks), [k for k in order if is_lora_key(k)])
    return (strategy.features(subs), [a["task"] for a in record["assignments"]],
            [a["cluster"] for a in record["assignments"]])


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates on the first two principal axes, their share of the variance)."""
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    var = s ** 2
    share = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return coords, np.pad(share, (0, 2 - len(share)))


# ---- plots -----------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (PNG; its folder made if missing) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})
    pyplot().close(fig)


def plot_accuracy_per_round(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1.0, 3.6), sharey=True, squeeze=False)
    majority_shown = False
    for ax, run in zip(axes[0], runs):
        curves, majority = accuracy_by_round(run), majority_accuracy(run)
        for task in run.tasks:
            if task in curves:
                (line,) = ax.plot(*curves[task], marker="o", ms=3, label=task)
                if task in majority:
                    ax.axhline(majority[task], color=line.get_color(), ls=":", lw=1.2)
                    majority_shown = True
        rounds, mean = _mean_curve(curves)
        ax.plot(rounds, mean, color="black", ls="--", lw=1.5, label="mean")
        ax.set_title(f"{run.name} ({run.method})", fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel(f"test {LABELS[runs[0].metric]} (serving adapter)")
    handles, names = axes[0][-1].get_legend_handles_labels()
    if majority_shown:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="grey", ls=":", lw=1.2))
        names.append("majority class\n(task's colour)")
    axes[0][-1].legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def _mean_curve(curves: dict[str, tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = defaultdict(list)
    for rounds, accs in curves.values():
        for r, a in zip(rounds, accs):
            by_round[r].append(a)
    rounds = sorted(by_round)
    return rounds, [float(np.mean(by_round[r])) for r in rounds]


def plot_accuracy_vs_uplink(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for run in runs:
        x, y = accuracy_vs_uplink(run)
        ax.plot(np.asarray(x) / 1e6, y, marker="o", ms=4, label=f"{run.name} ({run.method})")
    ax.set_xlabel("cumulative uplink (MB)")
    ax.set_ylabel(f"mean test {LABELS[runs[0].metric]}")
    ax.set_title("accuracy for the bytes clients sent", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_clustering(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for run in runs:
        ax.plot(*clustering_by_round(run), marker="o", ms=4, label=run.name)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("clustering accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_confusion(run: Run, path: Path) -> int:
    tasks, clusters, counts, round_ = confusion(run)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(clusters) + 1.2, 0.9 + 0.45 * len(tasks)))
    ax.imshow(counts, cmap="Blues", aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(clusters)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(clusters)), [str(c) for c in clusters])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("cluster (slot)")
    ax.set_title(f"{run.name}: round {round_} submissions", fontsize=9)
    save_figure(fig, path)
    return round_


def plot_projection(run: Run, rounds: list[int], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rounds), figsize=(4.4 * len(rounds) + 1.4, 3.8), squeeze=False)
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(run.tasks)}
    seen_clusters: set[int] = set()
    for ax, r in zip(axes[0], rounds):
        feats, tasks, clusters = kmeans_features(run, r)
        coords, share = pca_2d(feats)
        for (x, y), t, c in zip(coords, tasks, clusters):
            ax.scatter(x, y, color=colours[t], marker=MARKERS[c % len(MARKERS)], s=36, edgecolors="black",
                       linewidths=0.4)
            seen_clusters.add(c)
        acc = next(c["clustering_accuracy"] for c in run.clusters if c["round"] == r)
        ax.set_title(f"round {r}: clustering accuracy {acc:.2f}", fontsize=9)
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.0%})")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colours[t], label=t) for t in run.tasks]
    handles += [Line2D([], [], ls="", marker=MARKERS[c % len(MARKERS)], color="grey", label=f"cluster {c}")
                for c in sorted(seen_clusters)]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


# ---- the document ----------------------------------------------------------------------------------

TABLE_HEAD = ["run", "method", "rounds", "mean accuracy", "personalized", "clustering accuracy", "uplink bytes",
              "downlink bytes", "epsilon (DP)", "wall time (s)"]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        s = run.summary
        rows.append([run.name, run.method, str(s.get("rounds", "-")), _fmt(s.get("mean_accuracy"), ".4f"),
                     _fmt(s.get("mean_personalized_accuracy"), ".4f"), _fmt(s.get("clustering_accuracy"), ".4f"),
                     _fmt(s.get("uplink_bytes"), ","), _fmt(s.get("downlink_bytes"), ","),
                     _fmt((s.get("privacy") or {}).get("epsilon"), ".3g"), _fmt(s.get("wall_seconds"), ".1f")])
    return rows


def per_task_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-task table: one row per run with each task's final accuracy (the serving adapter's;
    a causal-LM run's LM loss), then the majority-class accuracy of each task: one row when the runs share a test
    sample, else one per run (the sample follows the seed)."""
    tasks = list(dict.fromkeys(t for run in runs for t in run.tasks))
    rows = []
    for run in runs:
        s = run.summary
        scores = s.get("per_task_accuracy") or s.get("per_task_lm_loss") or {}
        rows.append([run.name, run.method, *(_fmt(scores.get(t), ".4f") for t in tasks)])
    baselines = {}
    for run in runs:
        majority = majority_accuracy(run)
        if majority:
            baselines.setdefault(tuple(majority.get(t) for t in tasks), []).append(run.name)
    for values, names in baselines.items():
        label = "majority class" if len(baselines) == 1 else f"majority class ({', '.join(names)})"
        rows.append([label, "-", *(_fmt(v, ".4f") for v in values)])
    return ["run", "method", *tasks], rows


def build_report(run_dirs: list[str | Path], out: str | Path | None = None, command: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out`` (default: the first run); return report.md."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, unique_names(paths))]
    out = Path(out) if out is not None else paths[0]
    out.mkdir(parents=True, exist_ok=True)
    blocks: list[tuple] = [("h1", "fltac report")]
    if command:
        blocks.append(("code", command))
    blocks.append(("p", "Runs: " + "; ".join(f"`{r.name}` = {r.path}" for r in runs)))
    blocks.append(("table", TABLE_HEAD, table_rows(runs)))
    blocks.append(("p", "Mean accuracy is the mean over tasks of the serving global adapter's test accuracy after the "
                        "last round; personalized: each client's own assigned adapter on its share; bytes are summed "
                        "over all rounds; wall time includes setup."))
    blocks += [("h2", "Accuracy per task"), ("table", *per_task_rows(runs)),
               ("p", "The serving global adapter's test accuracy on each task after the last round (a causal-LM run: "
                     "its LM loss). Majority class: the accuracy of always predicting the task's most frequent label "
                     "of the same test sample, the floor a classifier must beat.")]

    plot_accuracy_per_round(runs, out / "accuracy_per_round.png")
    blocks += [("h2", "Accuracy per task per round"), ("img", "accuracy_per_round.png", "per-task accuracy per round")]
    plot_accuracy_vs_uplink(runs, out / "accuracy_vs_uplink.png")
    blocks += [("h2", "Mean accuracy against cumulative uplink"),
               ("img", "accuracy_vs_uplink.png", "mean accuracy against cumulative uplink bytes")]

    clustered = [r for r in runs if r.clusters]
    blocks.append(("h2", "Clustering"))
    if not clustered:
        blocks.append(("p", "No run clusters its clients' adapters (only FL-TAC does)."))
    else:
        plot_clustering(clustered, out / "clustering_accuracy.png")
        blocks += [("p", "Clustering accuracy: the share of submitted adapters in the cluster matched to their own "
                             "task, under the best one-to-one matching of clusters to tasks (Hungarian)."),
                   ("img", "clustering_accuracy.png", "clustering accuracy per round")]
        for run in clustered:
            name = f"confusion_{slug(run.name)}.png"
            round_ = plot_confusion(run, out / name)
            blocks += [("h3", f"{run.name}: task by cluster, round {round_}"), ("img", name, "task-by-cluster counts")]
            rounds = submission_rounds(run)
            if rounds:
                pname = f"projection_{slug(run.name)}.png"
                plot_projection(run, rounds, out / pname)
                blocks += [("h3", f"{run.name}: submitted adapters, 2-D PCA"),
                           ("p", "Each point is one adapter a client submitted, as the server's clustering saw it "
                                 f"({_feature_note(run.config)}); colour: its true task (never sent), marker: the "
                                 "cluster it was put in."),
                           ("img", pname, "PCA of submitted adapters")]
            else:
                blocks.append(("p", f"{run.name} saved no submissions (adapters/submissions_round_<t>.safetensors: "
                                    "runs made before fltac kept them), so there is no projection."))
    others = [r.name for r in runs if not r.clusters]
    if clustered and others:
        blocks.append(("p", f"No clustering in: {', '.join(others)}."))

    md = out / "report.md"
    md.write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks))
    return md


def _feature_note(config: dict) -> str:
    server = from_dict(config).server  # the run's values, the config's defaults for keys it predates
    what = {"lora_B": "LoRA B matrices", "lora": "LoRA matrices", "lora_and_head": "LoRA matrices and head"}[
        server.cluster_features]
    on = "update since the adapter it was sent" if server.cluster_on == "update" else "weights"
    norm = ", scaled to unit length" if server.cluster_normalize else ""
    projected = f", projected to {server.kmeans_dims} dimensions" if server.kmeans_dims is not None else ""
    return f"{what}, {on}{norm}{projected}; {server.clustering} clustering"


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "code":
            lines += ["```", rest[0], "```", ""]
        elif kind == "img":
            lines += [f"![{rest[1]}]({rest[0]})", ""]
        elif kind == "table":
            head, rows = rest
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(blocks: list[tuple]) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(rest[0])}</code></pre>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}"></p>')
        elif kind == "table":
            head, rows = rest
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
             "td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%}")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>fltac report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
