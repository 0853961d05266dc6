"""Benchmarks, all of them: run every bench/ script and eval at bounded sizes, then write BENCHMARKS.md.

    python bench/report.py --run            # measure (about 18 min on 2 cores), then render
    python bench/report.py                  # render BENCHMARKS.md from bench/results/*.json
    python bench/report.py --run --only service,soak

Each step's raw JSON lands in bench/results/ (not committed). The speed/depth plot (R@1 against
milliseconds per query, late/mid/early at each k) is written to bench/tradeoff.png. GPU figures come
from bench/gpu.sh on a GPU machine (bench/results/gpu.json); without that file the section says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "bench" / "tradeoff.png"
CLI = str(Path(sys.executable).parent / "imsearch")
PY = sys.executable


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # "{out}" is replaced by the JSON path; without it, stdout is the JSON
    what: str

    def command(self) -> str:
        shown = [a.replace(CLI, "imsearch").replace(PY, "python") for a in self.argv]
        return " ".join(a for a in shown if a != "--out" and a != "{out}")


CUT_MID = "models/runs/reranker-mid-2block-distil.safetensors"  # not the default: see section_tokens_cut
STEPS = (
    Step("encoder", (CLI, "eval", "encoder", "--json"), "dual encoder, seed 2026"),
    Step("encoder_seed7", (CLI, "eval", "encoder", "--json", "--seed", "7"), "dual encoder, seed 7"),
    Step("tradeoff", (CLI, "eval", "tradeoff", "--json", "--errors"), "late/mid/early at k 8..64, seed 2026"),
    Step("tradeoff_seed7", (CLI, "eval", "tradeoff", "--json", "--errors", "--seed", "7", "--ks", "16"),
         "late/mid/early at k 16, seed 7"),
    Step("ann", (PY, "bench/ann.py", "--n", "200000", "--kinds", "auto,hnsw,ivfpq", "--out", "{out}"), "ANN choice"),
    Step("ann_filter", (PY, "bench/ann.py", "--filter", "--n", "1000000", "--queries", "100", "--threads", "1",
                        "--out", "{out}"), "filtered search at 1M vectors, one core"),
    Step("index_throughput", (PY, "bench/index_throughput.py", "--n", "3000", "--big", "6000", "--rounds", "3",
                              "--out", "{out}"), "indexing throughput and memory"),
    Step("service", (PY, "bench/service.py", "--n", "100000", "--n-real", "2000", "--duration", "5",
                     "--out", "{out}"), "HTTP overhead and micro-batching"),
    Step("soak", (PY, "bench/soak.py", "--scenes", "1000", "--clients", "16", "--duration", "60", "--warmup", "10",
                  "--out", "{out}"), "soak: mixed traffic on a server process"),
    Step("freeform", (CLI, "eval", "freeform", "--json"), "queries as people type them, seed 2026"),
    Step("freeform_seed7", (CLI, "eval", "freeform", "--json", "--seed", "7"), "queries as people type them, seed 7"),
    Step("admission", (PY, "bench/admission.py", "--scenes", "1000", "--rounds", "60", "--heavy", "4",
                       "--out", "{out}"), "small queries beside large reranks"),
    Step("tokens", (PY, "bench/tokens.py", "--n", "1000", "--seeds", "2026,7", "--out", "{out}"),
         "token store formats: bytes per image and mid R@1"),
    Step("tokens_cut", (PY, "bench/tokens.py", "--n", "1000", "--seeds", "2026,7", "--mid", CUT_MID, "--baseline",
                        "models/reranker-mid.safetensors", "--out", "{out}"),
         "a cheaper mid (its first two blocks, distilled) against the committed one"),
    Step("gate", (CLI, "eval", "gate", "--fit", "--json"), "rerank auto: fitted on the validation seed, seed 2026"),
    Step("gate_seed7", (CLI, "eval", "gate", "--json", "--seed", "7"), "rerank auto, seed 7"),
    Step("explain", (CLI, "eval", "explain", "--json"), "explain: named objects located inside them, seed 2026"),
    Step("explain_seed7", (CLI, "eval", "explain", "--json", "--seed", "7"), "explain, seed 7"),
    Step("real_models", (PY, "bench/real_models.py", "--n", "256", "--out", "{out}"),
         "ViT-B-32 indexing, mid over its tokens, BLIP base"),
)
STEP = {step.name: step for step in STEPS}


def run(step: Step) -> float:
    out = RESULTS / f"{step.name}.json"
    argv = [a.replace("{out}", str(out)) for a in step.argv]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{step.name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    if "{out}" not in step.argv:
        out.write_text(done.stdout.strip().splitlines()[-1] + "\n")
    seconds = time.perf_counter() - start
    timing = load("timings") or {}
    timing[step.name] = round(seconds, 1)
    (RESULTS / "timings.json").write_text(json.dumps(timing, indent=2) + "\n")
    return seconds


def load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def machine() -> str:
    import faiss
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, faiss {faiss.__version__}")


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:,.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def section_encoder() -> str:
    a, b = load("encoder"), load("encoder_seed7")
    if not a:
        return "## Embedded dual encoder\n\nNot measured yet: `python bench/report.py --run --only encoder`.\n"
    history = training_history(json.loads((ROOT / "models" / "tiny-clip" / "training_log.json").read_text()))
    steps, seconds = sum(int(log["config"]["steps"]) for log in history), sum(log["seconds"] for log in history)
    size = (ROOT / "models" / "tiny-clip" / "open_clip_model.safetensors").stat().st_size / 2**20
    rows = [[f"seed {r['seed']}", r["t2i_r1"], r["t2i_r5"], r["t2i_r10"], r["i2t_r1"], r["binding_acc"]]
            for r in (a, b) if r]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(a["errors"].items(), key=lambda kv: -kv[1]))
    return f"""## Embedded dual encoder (late fusion)

Training (`imsearch train encoder`, {steps} steps of {history[-1]['config']['batch_pairs']} scene/twin or description
pairs, in {len(history)} runs): {seconds:,.0f} s on the development machine; committed fp16 checkpoint {size:.1f} MB.
`{STEPS[0].command()}` and `{STEPS[1].command()}` (twin gallery, n 1000):

{table(["gallery", "t2i R@1", "R@5", "R@10", "i2t R@1", "binding_acc"], rows)}

Top-1 errors (seed 2026), by kind: {errors}.
"""


def tradeoff_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        e = r.get("errors", {})
        kinds = " / ".join(str(e.get(k, 0)) for k in ("binding", "relation", "shape", "size", "colour", "other"))
        out.append([r["tier"], r["k"], r["r1"], r["r5"], r["binding_acc"], round(r["ms_p50"], 1),
                    round(r["ms_p95"], 1), kinds])
    return out


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    styles = {"late": ("#444444", "o"), "mid": ("#1f77b4", "s"), "early": ("#d62728", "^")}
    for tier, (colour, marker) in styles.items():
        points = [r for r in rows if r["tier"] == tier]
        if not points:
            continue
        ax.plot([p["ms_p50"] for p in points], [p["r1"] for p in points], marker=marker, color=colour,
                label={"late": "late fusion (dual encoder)", "mid": "mid fusion (ITM cross-attention)",
                       "early": "early fusion (single stream)"}[tier])
        for p in points:
            if p["k"]:
                ax.annotate(f"k={p['k']}", (p["ms_p50"], p["r1"]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=colour)
    ax.set_xscale("log")
    # plain numbers at 1-2-5 steps: the log axis's default minor labels (2 x 10^0, 3 x 10^0, ...) overlap
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("milliseconds per query, p50 (encode + search + rerank), 2 CPU cores")
    ax.set_ylabel("R@1 on the twin gallery (n 1000)")
    ax.set_title("Speed vs depth: late, mid and early fusion")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)


def training_history(log: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint's training log and those of the runs it was warm-started from, oldest first."""
    earlier = log.get("previous") or []
    earlier = [earlier] if isinstance(earlier, dict) else earlier  # one run, or several (newest first)
    return [old for prior in reversed(earlier) for old in training_history(prior)] + [log]


def _commands(log: dict[str, Any]) -> list[str]:
    commands = log.get("commands", log.get("command", []))
    return [commands] if isinstance(commands, str) else list(commands)


def section_rerankers() -> str:
    rows, seven = load("tradeoff"), load("tradeoff_seed7")
    if not rows:
        return "## Rerankers\n\nNot measured yet: `python bench/report.py --run --only tradeoff`.\n"
    plot(rows)
    trained = []
    for kind in ("mid", "early"):
        info = json.loads((ROOT / "models" / f"reranker-{kind}.json").read_text())
        history = training_history(info)
        runs = [run for log in history for run in _commands(log)]
        how = f"`{runs[0]}`" + (f" + {len(runs) - 1} warm-started continuations" if len(runs) > 1 else "")
        steps, seconds = (sum(float(log[key]) for log in history) for key in ("steps", "seconds"))
        trained.append([kind, how, int(steps), f"{seconds:,.0f}", f"{info['parameters']:,}",
                        f"{info['bytes'] / 2**20:.1f}", info["fusion_weight"], info["val_r1_at_16"]])
    late = next(r for r in rows if r["tier"] == "late")
    mid16 = next((r for r in rows if r["tier"] == "mid" and r["k"] == 16), None)
    early16 = next((r for r in rows if r["tier"] == "early" and r["k"] == 16), None)
    targets = ""
    if mid16 and seven:
        mid7 = next(r for r in seven if r["tier"] == "mid")
        early7 = next((r for r in seven if r["tier"] == "early"), None)
        cost = mid16["ms_p50"] - late["ms_p50"]
        targets = table(["target (issue 4)", "seed 2026", "seed 7", ""], [
            ["mid k=16 R@1 ≥ 0.95", mid16["r1"], mid7["r1"], verdict(min(mid16["r1"], mid7["r1"]) >= 0.95)],
            ["mid k=16 binding_acc ≥ 0.98", mid16["binding_acc"], mid7["binding_acc"],
             verdict(min(mid16["binding_acc"], mid7["binding_acc"]) >= 0.98)],
            ["rerank cost (mid − late p50) ≤ 20 ms", round(cost, 1), "", verdict(cost <= 20)],
            ["early R@1 ≥ mid R@1 (k=16)", early16["r1"] if early16 else "", early7["r1"] if early7 else "",
             verdict(bool(early16 and early7) and early16["r1"] >= mid16["r1"] and early7["r1"] >= mid7["r1"])],
        ])
    seven_rows = tradeoff_rows(seven) if seven else []
    return f"""## Rerankers: late vs mid vs early fusion

The committed checkpoints (`models/reranker-*.json` hold the training log):

{table(["tier", "trained with", "steps", "seconds", "parameters", "MB (fp16)", "fusion weight", "val R@1 @16"],
       trained)}

`{STEPS[2].command()}` — one query at a time, end to end (encode + search + rerank), twin gallery of
1,000 images, seed 2026. Errors are the top-1 mistakes by kind (binding / relation / shape / size /
colour / other):

{table(["tier", "k", "R@1", "R@5", "binding_acc", "ms p50", "ms p95", "top-1 errors"], tradeoff_rows(rows))}

![R@1 against milliseconds per query](bench/tradeoff.png)

`{STEPS[3].command()}`:

{table(["tier", "k", "R@1", "R@5", "binding_acc", "ms p50", "ms p95", "top-1 errors"], seven_rows)}

{targets}
"""


def section_freeform() -> str:
    a, b = load("freeform"), load("freeform_seed7")
    if not a:
        return ""
    by = {(r["tier"], r["kind"]): r for r in a["rows"]}
    seven = {(r["tier"], r["kind"]): r for r in b["rows"]} if b else {}
    kinds = list(a["examples"])
    tiers = list(dict.fromkeys(r["tier"] for r in a["rows"]))
    def both(key: str, tier: str, kind: str) -> str:
        return " / ".join(f"{run[(tier, kind)].get(key, float('nan')):.2f}" for run in (by, seven) if run)

    rows = [[kind, f"`{a['examples'][kind]}`", *(both("p1", t, kind) for t in tiers), both("recall_at_k", "late", kind)]
            for kind in kinds]
    ms = ", ".join(f"{t} {statistics.median(r['ms_p50'] for r in a['rows'] if r['tier'] == t):.1f} ms"
                   for t in tiers)
    calibration = ", ".join(f"{t} {e:.3f}" for t, e in a["calibration_error"].items())
    autos = [x["auto"] for x in (a, b) if x and x.get("auto")]
    auto = ("rerank auto (margin " + f"{autos[0]['margin']:.4f}): " + " / ".join(
        f"{x['gain_share']:.0%} of mid's p@1 gain over late at {x['cost_share']:.0%} of its rerank cost" for x in autos)
        + " (each tier's mean rerank ms, the tiers taking turns on every query; target ≥ 90 % at ≤ 30 %: "
        + verdict(all(x["gain_share"] >= 0.9 and x["cost_share"] <= 0.3 for x in autos)) + ").") if autos else ""
    return f"""## Queries as people type them (`imsearch eval freeform`)

`{STEP["freeform"].command()}` and `{STEP["freeform_seed7"].command()}` — a gallery of
{a['n']:,} images ({a['n'] // 2:,} random scenes and their twins, not deduplicated: many images can be
right), {a['queries']:,} queries ({a['queries'] // len(kinds)} per kind); a hit is right when the
description is true of it. p@1 per tier (seed 2026 / seed 7), rerankers at k = {a['k']}, and recall@{a['k']}: the
share of queries with a true image among the dual encoder's top {a['k']}, the most a reranker at k = {a['k']} can get
right; ms p50 per query: {ms}. Calibration error of p(match) over the reranked candidates (seed 2026): {calibration}.
{auto}

{table(["kind", "example", *(f"{t} p@1" for t in tiers), f"recall@{a['k']}"], rows)}

{freeform_targets([x for x in (a, b) if x])}

{ceiling(by, seven, kinds, a['k'])}
"""


def ceiling(by: dict[tuple[str, str], Any], seven: dict[tuple[str, str], Any], kinds: list[str], k: int) -> str:
    """A sentence on the most a reranker at k can reach on the kind whose candidates hold a true image least often."""
    runs = [run for run in (by, seven) if run]
    if not all(("late", kind) in run and "recall_at_k" in run[("late", kind)] for run in runs for kind in kinds):
        return ""
    worst = min(kinds, key=lambda kind: min(run[("late", kind)]["recall_at_k"] for run in runs))
    values = " / ".join(f"{run[('late', worst)]['recall_at_k']:.2f}" for run in runs)
    return (f"The rerankers' ceiling at k = {k} is the dual encoder's recall@{k}; on the kind where it is lowest "
            f"({worst}) it is {values}: no reranker of these candidates can rank a true image first more often.")


RELATION_KINDS = ("full", "no_size", "two_of_three", "relation_synonym")  # the kinds whose queries name relations


def freeform_targets(runs: list[dict[str, Any]]) -> str:
    """Issue 23's targets, per seed: the worst kind of each."""
    def p1(run: dict[str, Any], tier: str, kind: str) -> float:
        return next(r["p1"] for r in run["rows"] if r["tier"] == tier and r["kind"] == kind)

    def worst(tier: str, gap: str | None = None, kinds: tuple[str, ...] | None = None) -> list[float]:
        return [min(p1(run, tier, k) - (p1(run, gap, k) if gap else 0.0) for k in (kinds or tuple(run["examples"])))
                for run in runs]

    checks = [("mid p@1 ≥ 0.90 on every kind (worst kind)", worst("mid"), 0.90),
              ("late p@1 ≥ 0.60 on every kind (worst kind)", worst("late"), 0.60),
              ("early − mid ≥ 0 on every kind (worst kind)", worst("early", "mid"), 0.0),
              ("mid − late ≥ 0.15 where relations are named (worst kind)", worst("mid", "late", RELATION_KINDS), 0.15)]
    rows = [[name, *(round(v, 2) for v in values), verdict(min(values) >= floor)] for name, values, floor in checks]
    for tier in ("mid", "early"):
        errors = [run["calibration_error"][tier] for run in runs]
        rows.append([f"{tier} calibration error ≤ 0.05", *(round(e, 3) for e in errors), verdict(max(errors) <= 0.05)])
    return table(["target (issue 23)", *(f"seed {run['seed']}" for run in runs), ""], rows)


def section_tokens() -> str:
    r = load("tokens")
    if not r:
        return ""
    rows = [[x["seed"], x.get("stored", "tokens"), x["format"], x.get("layers", ""), f"{x['bytes_per_image']:,}",
             x["r1"], x["r1_loss_pt"], x.get("r1_loss_own_pt", x["r1_loss_pt"]), x["binding_acc"], x["ms_p50"],
             x.get("rerank_ms_p50", ""), x.get("rerank_cost", ""), x.get("rerank_cost_own_tokens", "")]
            for x in r["gallery"]]
    shapes = [[x["model"], x["format"], f"{x['bytes_per_image']:,}", x["gb_per_million"], x["vs_fp16"]]
              for x in r["shapes"]]
    fits = [x for x in r["gallery"] if x["bytes_per_image"] <= 8000]
    names = sorted({x["format"] for x in fits})
    ok = [n for n in names if all(x.get("r1_loss_own_pt", x["r1_loss_pt"]) <= 0.5 for x in fits if x["format"] == n)]
    sides = [x for x in r["gallery"] if x.get("stored") == "mid side"]
    worst = {f: max(x["rerank_cost"] for x in sides if x["format"] == f) for f in {x["format"] for x in sides}}
    best = min(worst, key=lambda f: worst[f]) if worst else None
    today = "the earlier mid over fp16 tokens, first row" if r.get("baseline") else "fp16 tokens"
    cost = (f"Target (issue 25): mid rerank cost at k = {r['k']} ≤ 40 % of today's ({today}), side by side in "
            f"one run — best: the side as {best}, {100 * worst[best]:.0f} % on the worse seed: "
            f"{verdict(worst[best] <= 0.4)}.") if best else ""
    return f"""## Token store (`bench/tokens.py`)

`{STEP["tokens"].command()}` — the twin gallery of each seed embedded once, its tokens kept as
`imsearch index build --tokens FORMAT` keeps them, then mid's image side kept in their place as `--tiers mid`
stores it; the mid reranker at k = {r['k']} over each, one query at a time (ms p50 of the whole query; rerank
ms p50 with the candidates' features read and decoded, every stored form taking its turn on each of 300
queries; loss and cost: against the first row, fp16 tokens or with `--baseline` an earlier mid over them).
A merged format (`+keepK`, K a quarter of the patches) keeps
the K patches least like the image's median patch and stores the others as their mean; a read puts every patch
back, so the rerank's cost is the unmerged one's.

{table(["seed", "stored", "format", "mid blocks", "bytes per image", "mid R@1", "loss (pt)", "loss vs own fp16 (pt)",
        "binding", "ms p50", "rerank ms p50", "rerank cost", "cost vs own fp16"], rows)}

Target (issue 25): stored features ≤ 8 KB per image at ≤ 0.5 pt R@1 loss against fp16 —
{verdict(bool(ok))}{f" with {', '.join(ok)}" if ok else ""}.
{cost}

The same formats for the real models' token shapes (their merged R@1 is not measured here: random weights):

{table(["tokens of", "format", "bytes per image", "GB per million images", "of fp16"], shapes)}
"""


def section_tokens_cut() -> str:
    r = load("tokens_cut")
    if not r:
        return ""
    keep = [x for x in r["gallery"] if x["format"] in ("fp16", "int8", "int8+keep16")]
    rows = [[x["seed"], x["stored"], x["format"], x["layers"], f"{x['bytes_per_image']:,}", x["r1"], x["r1_loss_pt"],
             x["binding_acc"], x["rerank_ms_p50"], x["rerank_cost"]] for x in keep]
    small = [x for x in r["gallery"] if x["stored"] == "mid side" and x["bytes_per_image"] <= 8000]
    both = [x for x in small if x["r1_loss_pt"] <= 0.5 and x["rerank_cost"] <= 0.4]
    log = json.loads((ROOT / CUT_MID).with_suffix(".json").read_text())
    runs = [*(_commands(json.loads((ROOT / log["init"]).with_suffix(".json").read_text())) if log.get("init") else []),
            *_commands(log)]
    return f"""### A cheaper mid: its first two blocks, distilled (`{STEP["tokens_cut"].command()}`)

The committed mid's first two blocks (the second, now the last, runs at [ENC] only), trained by
{" then ".join(f"`{c}`" for c in runs)}. It is not the default: on queries as people type them it loses
ground (p@1 by kind in the README). Serve it as `IMSEARCH_RERANKERS='["mid={CUT_MID}"]'`. Loss and cost
against the first row, the committed mid over fp16 tokens, timed in the same turns:

{table(["seed", "stored", "format", "mid blocks", "bytes per image", "mid R@1", "loss (pt)", "binding",
        "rerank ms p50", "rerank cost"], rows)}

Stored features ≤ 8 KB at ≤ 0.5 pt loss and a rerank cost ≤ 40 % together: {verdict(bool(both))}{
    f" ({', '.join(sorted({x['format'] for x in both}))})" if both else ""}.
"""


def section_gate() -> str:
    runs = [r for r in (load("gate"), load("gate_seed7")) if r]
    if not runs:
        return ""
    rows = [[r["seed"], f"{r['margin']:.4f}", r["late_r1"], r["mid_r1"], r["auto_r1"], f"{r['reranked']:.0%}",
             round(r.get("auto_depth", 16.0), 2), f"{r['gain_share']:.0%}", round(r["mid_rerank_ms"], 1),
             round(r["auto_rerank_ms"], 1), f"{r['cost_share']:.0%}"] for r in runs]
    met = all(r["gain_share"] >= 0.9 and r["cost_share"] <= 0.3 for r in runs)
    return f"""## rerank "auto" (`imsearch eval gate`)

`{STEP["gate"].command()}` then `{STEP["gate_seed7"].command()}` — rerank "auto" on the twin gallery: mid
reranks only the candidates whose cosine is within the margin of the best (when two or more are; "depth": how
many, per reranked query), against mid over all k = 16; the margin fitted on the validation seed as the smallest
that keeps 90 % of mid's R@1 gain over late. Rerank ms are each query's mean (0 for a query not reranked), auto's
timed beside mid's in one run, mid reading its image side as a default index stores it. On queries as people type
them see the freeform section above.

{table(["seed", "margin", "late R@1", "mid R@1", "auto R@1", "reranked", "depth", "gain kept", "mid ms", "auto ms",
        "cost share"], rows)}

Target (issue 26): ≥ 90 % of mid's gain at ≤ 30 % of its mean rerank cost — {verdict(met)}.
"""


def section_explain() -> str:
    runs = [row for r in (load("explain"), load("explain_seed7")) if r for row in r]
    if not runs:
        return ""
    rows = [[r["tier"], r["seed"], r["captions"], r["objects"], f"{r['inside']:.1%}", f"{r['inside_small']:.1%}",
             f"{r['inside_large']:.1%}", round(r["median_offset"], 3)] for r in runs]
    met = all(r["inside"] >= 0.95 for r in runs if r["tier"] == "mid")
    return f"""## Why it matched (`imsearch eval explain`)

`{STEP["explain"].command()}` then `{STEP["explain_seed7"].command()}` — `explain` on each twin-gallery caption's
own image (a true match): where the tier's grounding head puts each object the caption names, read off that
noun's state after the first block. Inside: within the object's box; offset: the distance from its centre in
half-sides (1 is the box's edge).

{table(["tier", "seed", "captions", "objects", "inside", "small", "large", "median offset"], rows)}

Target (issue 26): mid locates ≥ 95 % of named objects inside them — {verdict(met)}.
"""


def section_real_models() -> str:
    r = load("real_models")
    if not r:
        return ""
    vit, mid, blip = r["vit_b32"], r["mid_over_vit_b32"], r["blip_base"]
    rows = [["ViT-B-32 index build / bare encode loop", f"{vit['pipeline_images_per_s']} / "
             f"{vit['bare_images_per_s']} images/s", f"{vit['ratio']} {verdict(vit['ratio'] >= 0.85)} (≥ 0.85)"],
            ["ViT-B-32 text encode, one query", f"{vit['text_encode_ms_p50']} ms", ""],
            [f"mid reranker over ViT-B-32 tokens, k = {mid['k']}", f"{mid['ms_p50']} ms", ""],
            [f"BLIP base ITM over its stored features {blip['feature_shape']}, k = {blip['k']}",
             f"{blip['ms_p50']} ms", ""],
            ["BLIP base vision tower at index time", f"{blip['vision_images_per_s']} images/s", ""]]
    drift = ("\nA ratio above 1 is the machine's speed drifting between rounds: the pipeline does the bare loop's "
             "work and more.\n" if vit["ratio"] > 1 else "")
    return f"""## Real-size models (`bench/real_models.py`, {r['device']})

`{STEP["real_models"].command()}` — random weights at the real sizes (speed does not depend on them),
saved and loaded as a user's would be: `imsearch index build` of {vit['n']} scenes with ViT-B-32
({vit['workers']} decoding workers: the default, cores − 2) against its bare encode loop over the same images
decoded beforehand, best of {vit['rounds']} rounds each; one query's text encode; each reranker's one call over k
candidates (p50).

{table(["measure", "figure", "target"], rows)}
{drift}
The bytes per image of each tier's stored features (ViT-B-32's tokens for mid and early, BLIP's
`--tiers blip` features) in each `--tokens` format are in the token store section above.
"""


def section_ann() -> str:
    r = load("ann")
    if not r:
        return ""
    rows = [[x["kind"], x["chosen"], ", ".join(f"{k} {v}" for k, v in x["params"].items() if v and k != "kind"),
             x["build_s"], x["recall_at_10"], x["ms_per_query"], f"{x['speedup_vs_exact']}×"] for x in r["indexes"]]
    auto = next(x for x in r["indexes"] if x["kind"] == "auto")
    ok = auto["recall_at_10"] >= 0.95 and auto["speedup_vs_exact"] >= 10
    return f"""## ANN index choice (`bench/ann.py`)

`{STEPS[4].command()}` — {r['n']:,} clustered L2-normalised {r['dim']}-d vectors, queries one at a
time; exact search takes {r['exact_ms_per_query']} ms per query in the same run.

{table(["index", "chosen", "parameters", "build s", "recall@10", "ms/query", "vs exact"], rows)}

Target (the automatically chosen index): recall@10 ≥ 0.95 at ≥ 10× exact — {verdict(ok)}.
"""


def section_filters() -> str:
    r = load("ann_filter")
    if not r:
        return ""
    from indexer.ann import OVERFETCH_SHARE

    def path(x: dict[str, Any]) -> str:  # the branch of ann.search_within that answered
        if x["exact_path"]:
            return "exact over the selection"
        return "unfiltered 2/share deep, the selected kept" if x["share"] >= OVERFETCH_SHARE else "ANN + selector"

    rows = [[f"{x['share']:.0%}", x["chosen"], path(x), x["recall_at_10"], x["ms_p50"], x["exact_filtered_ms"],
             x["speedup_vs_exact"]] for x in r["rows"]]
    half = [x for x in r["rows"] if x["share"] == 0.5]
    checks = [["recall@10 ≥ 0.95 at every share", verdict(all(x["recall_at_10"] >= 0.95 for x in r["rows"]))],
              ["p50 ≤ 10 ms at every share", verdict(all(x["ms_p50"] <= 10 for x in r["rows"]))],
              ["≥ 5× exact filtered search at 50 %", verdict(bool(half) and all(x["speedup_vs_exact"] >= 5
                                                                               for x in half))]]
    return f"""## Filtered search (`bench/ann.py --filter`)

`{STEP["ann_filter"].command()}` — {r['n']:,} clustered {r['dim']}-d vectors, a filter's selection of a random
share of them (uncorrelated with the clusters, as a date range is), `Index.search`'s policy inside it (exact over
the selection's vectors when that is cheaper; a broad selection from an unfiltered search 2/share deep; else FAISS's
id selector; queries that come back short are searched again, as `ann.search_within` says), one query at a time on
one core, against exact search over the selected vectors (in memory, as an index keeps them for a repeated filter;
a filter's first query per version also evaluates it and reads those vectors).

{table(["selected", "index", "path", "recall@10", "ms p50", "exact filtered ms", "speed-up"], rows)}

{table(["target (issue 26)", ""], checks)}
"""


def section_indexing() -> str:
    r = load("index_throughput")
    if not r:
        return ""
    rss = ", ".join(f"{int(n):,} images: {v:,.0f} MiB" for n, v in r["peak_rss_mib"].items())
    return f"""## Indexing throughput and memory (`bench/index_throughput.py`)

`{STEPS[5].command()}` — scene PNGs, tiny model, batch {r['batch']}.

{table(["measure", "value"], [
        ["bare model loop (preprocessed tensors in memory)", f"{r['bare_images_per_s']} images/s"],
        ["full pipeline (list, read, hash, decode, encode, write shards, FAISS, publish)",
         f"{r['pipeline_images_per_s']} images/s"],
        ["ratio (target ≥ 0.85)", f"{r['ratio']} — {verdict(r['ratio'] >= 0.85)}"],
        ["peak RSS of `imsearch index build`", rss]])}
"""


def section_service() -> str:
    r = load("service")
    if not r:
        return ""
    rows = [[x["concurrency"], x["rerank"], x["qps"], x["p50_ms"], x["p95_ms"], x["p99_ms"], x["errors"],
             x.get("server_cores", "")] for x in r["rows"]]
    q = r["qps_64_over_1"]
    free = r.get("unpinned", {})
    by = free.get("in_process_by_threads", {})
    return f"""## Service (`bench/service.py`)

`{STEPS[6].command()}` — {r['n_real']:,} real scenes indexed (patch tokens for the reranker), the ANN
index rebuilt over {r['n']:,} vectors with random unit fillers ({r['ann']}); the API as `imsearch serve
--workers {r.get('workers', 1)}` (caching and access log off), the load from a separate process (a bare asyncio HTTP/1.1
client, one keep-alive connection per client). Server CPU: the cores the API's processes kept busy
during each run, out of {r['machine'].split()[0]} (one process's Python work holds one GIL).

The overhead ratio compares the medians of {r.get('overhead_rounds', '?')} interleaved blocks of
{r.get('overhead_block', '?')} queries, in-process (encode + ANN search of one text) and over HTTP from
one blocking client. Interleaved, because a machine's speed can drift within a minute, which a
baseline measured at another moment would count as overhead. The target is the ratio a user sees:
server and client free to run on every core, against the faster of the in-process settings (all
cores, or one thread as the server runs a call). Beside it, the ratio with the server's processes and
the benchmark's pinned to one shared core, where the hand-offs are context switches and no idle core
has to be woken for each response.

{table(["measure", "value", "target"], [
        ["free on every core: in-process p50 (all cores / one thread), HTTP p50",
         f"{' / '.join(str(v) for v in by.values())} ms, {free.get('http_p50_ms')} ms", ""],
        ["overhead ratio, free on every core", free.get("overhead_ratio"),
         f"≤ 1.5 — {verdict(free.get('overhead_ratio', 99) <= 1.5)}"],
        ["pinned to one core: in-process p50, HTTP p50, ratio",
         f"{r['in_process_p50_ms']} ms, {r['http_p50_ms']} ms, {r['overhead_ratio']}", ""],
        ["QPS 64 clients / 1 client, rerank none", q["none"], f"≥ 2 — {verdict(q['none'] >= 2)}"],
        ["QPS 64 clients / 1 client, rerank mid", q["mid"], f"≥ 2 — {verdict(q['mid'] >= 2)}"],
        ["errors", r["errors"], "0"],
        ["mean micro-batch (text encoder / FAISS; all workers)",
         f"{r['batches']['text']} / {r['batches']['search']}", ""]])}

{table(["clients", "rerank", "QPS", "p50 ms", "p95 ms", "p99 ms", "errors", "server CPU (cores)"], rows)}
"""


def section_soak() -> str:
    r = load("soak")
    if not r:
        return ""
    kinds = [[k, v["requests"], v["p50_ms"], v["p95_ms"]] for k, v in r["by_kind"].items()]
    ok = r["errors"] == 0 and r["rss_growth"] < 0.05
    return f"""## Soak (`bench/soak.py`)

`{STEP["soak"].command()}` — `imsearch serve` as its own process ({r['images']:,} images, mid and early
loaded), {r['clients']} clients for {r['duration_s']:.0f} s after {r['warmup_s']:.0f} s of warm-up, a
mix of text (rerank none / mid / early), base64 images and uploads.

{table(["measure", "value"], [
        ["requests / errors", f"{r['requests']:,} / {r['errors']}"], ["QPS", r["qps"]],
        ["p50 / p95 / p99 ms", f"{r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']}"],
        ["server RSS after warm-up → end", f"{r['rss_mib_after_warmup']:,.0f} → {r['rss_mib_end']:,.0f} MiB"],
        ["RSS growth (target < 5%, 0 errors)", f"{100 * r['rss_growth']:.2f}% — {verdict(ok)}"]])}

{table(["kind", "requests", "p50 ms", "p95 ms"], kinds)}
"""


def section_admission() -> str:
    r = load("admission")
    if not r:
        return ""
    rows = [[tier, r["idle_p50_ms"][tier], r["loaded_p50_ms"][tier], r["idle_after_p50_ms"][tier], r["ratio"][tier],
             f"≤ {r['targets'][tier]:g}x — {verdict(r['ratio'][tier] <= r['targets'][tier])}"]
            for tier in ("mid", "none")]
    answers = ", ".join(f"{n} × {status}" for status, n in sorted(r["heavy_answers"].items()))
    return f"""## Small queries beside large reranks (`bench/admission.py`)

`{STEP["admission"].command()}` — `imsearch serve` (one API process, {r['images']:,} images), small
queries one at a time (mid with k 10 and rerank_k 16, and no rerank, interleaved), idle, then while
{r['heavy_clients']} clients send `{json.dumps(r['heavy_query'])}` back to back, then idle again.
Reranks are scored 32 candidates a step, smaller queries first, and queries of several steps never
take every rerank worker; each tier refuses (503, Retry-After) a query with more than
`IMSEARCH_RERANK_QUEUE` candidates ahead of it.

{table(["query", "idle p50 ms", "under load p50 ms", "idle again p50 ms", "load / idle", "target"], rows)}

The large queries meanwhile: {answers}; p50 {r['heavy_p50_ms']:,} ms.
"""


def section_gpu() -> str:
    r = load("gpu")
    if not r or r.get("device") != "cuda":
        return """## GPU (`bench/gpu.sh`)

Not measured: no GPU machine was lent to the sessions that produced this report. `bench/gpu.sh` is
the prepared run (ViT-B-32 and tiny encode throughput from tensors and through the whole pipeline,
FAISS GPU flat and IVF search at 1M and 10M vectors; under 8 minutes on one H200) and writes
`bench/results/gpu.json`, which this report then renders.
"""
    faiss_rows = [[f"{x['n']:,}", x.get("flat_qps"), x.get("ivf_qps"), x.get("ivf_recall_at_10")]
                  for x in r.get("faiss", [])]
    return f"""## GPU (`bench/gpu.sh`, {r['gpu_name']})

{table(["measure", "value"], [[k, v] for k, v in r.items() if k.endswith(("per_s", "ratio"))])}

{table(["vectors", "flat QPS", "IVF QPS", "IVF recall@10"], faiss_rows)}
"""


def render() -> str:
    timings = load("timings") or {}
    total = sum(timings.values())
    return "\n".join([
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python bench/report.py --run`) on {datetime.now(UTC):%Y-%m-%d}: "
        f"{machine()}. The steps took {total / 60:.1f} min in all. Speed figures are ratios against a "
        "baseline measured in the same run; raw JSON is in `bench/results/` (not committed).",
        "",
        section_encoder(), section_rerankers(), section_freeform(), section_gate(), section_explain(), section_tokens(),
        section_tokens_cut(), section_real_models(), section_ann(), section_filters(), section_indexing(),
        section_service(), section_soak(), section_admission(), section_gpu(),
    ]).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="measure before rendering")
    parser.add_argument("--only", default="", help="comma-separated step names to run")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.run:
        wanted = set(filter(None, args.only.split(","))) or {s.name for s in STEPS}
        for step in STEPS:
            if step.name in wanted:
                print(f"{step.name}: {step.command()}", flush=True)
                print(f"  {run(step):.0f} s", flush=True)
    args.out.write_text(render())
    print(f"wrote {args.out} and {PLOT}")


if __name__ == "__main__":
    main()
