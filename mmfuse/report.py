"""``report.md`` and the PNG plots of a comparison, from its ``report.json`` records.

The table has the survey's comparison axes as rows and the recipes as columns. Beside each axis stands
the survey's own claim (Wadekar et al. 2024, as summarised in the taxonomy reference) and a verdict
computed from the measurements: ``agrees``, ``disagrees``, or ``not testable`` when the records do not
hold the fusion types the claim compares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Record = dict[str, Any]
TYPE_COLOURS = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green", "D": "tab:red"}
TYPE_MARKERS = {"A": "s", "B": "^", "C": "o", "D": "D"}  # line plots: colour per recipe, marker per type


def _ok(records: list[Record]) -> list[Record]:
    return [r for r in records if "error" not in r]


def _comparable(records: list[Record]) -> list[Record]:
    """The successful records on the learning-curve task most fusion types share (types are compared
    on the same modality and data, never image recipes against audio ones)."""
    ok = _ok(records)
    tasks = {r["curve_task"] for r in ok}
    if not tasks:
        return []
    best = max(sorted(tasks), key=lambda t: len({r["survey_type"] for r in ok if r["curve_task"] == t}))
    return [r for r in ok if r["curve_task"] == best]


def _by_type(records: list[Record], value: Callable[[Record], float]) -> dict[str, float]:
    """Mean of ``value`` per survey type, over the comparable records."""
    types: dict[str, list[float]] = {}
    for r in _comparable(records):
        types.setdefault(r["survey_type"], []).append(value(r))
    return {t: mean(v) for t, v in sorted(types.items())}


def _order_verdict(values: dict[str, float], expected: str, what: str, best_first: bool = False) -> tuple[str, str]:
    """Does ``values`` (per type) rise in the order ``expected`` ("CBAD": C lowest) for the types
    present (``best_first``: fall in that order)?"""
    present = [t for t in expected if t in values]
    if len(present) < 2:
        return "not testable", f"needs two fusion types; measured only {', '.join(values) or 'none'}"
    ranked = sorted(present, key=values.get, reverse=best_first)
    verdict = "agrees" if ranked == present else "disagrees"
    order, sign = ("highest first", " > ") if best_first else ("lowest first", " < ")
    return verdict, f"{what}, {order}: " + sign.join(f"{t} {values[t]:.3g}" for t in ranked) + \
        " (type means over the recipes on the same task)"


def _slope(cost: list[dict[str, float]]) -> float:
    """Least-squares training FLOPs per extra media token."""
    xs, ys = [c["media_tokens"] for c in cost], [c["train_flops"] for c in cost]
    mx, my = mean(xs), mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def _final_accuracy(r: Record) -> float:
    return r["curve"][-1]["accuracy"] if r.get("curve") else float("nan")


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n else "0"


# (axis, the survey's claim, cell for one record, verdict over all records)
AXES: list[tuple[str, str, Callable[[Record], str], Callable[[list[Record]], tuple[str, str]]]] = [
    (
        "Training compute",
        "A high, B low-medium, C lowest, D highest",
        lambda r: f"{r['train_flops_per_sample'] / 1e9:.3f} GFLOP/sample; {r['train_samples_per_s']:.0f} samples/s; "
                  f"{r['peak_memory_mb']:.0f} MB peak",
        lambda rs: _order_verdict(_by_type(rs, lambda r: r["train_flops_per_sample"]), "CBAD", "train FLOPs/sample"),
    ),
    (
        "Training data",
        "C needs the least (align a connector, then instruction-tune); A and D need large corpora",
        lambda r: f"{r['curve_task']} {_final_accuracy(r):.1%} after {r['budget']['samples']} samples "
                  "(curve: " + ", ".join(f"{p['accuracy']:.0%}" for p in r["curve"]) + ")",
        lambda rs: _order_verdict(_by_type(rs, _final_accuracy), "CBAD", "accuracy at equal budget", best_first=True),
    ),
    (
        "Architecture complexity",
        "C simplest: LLM untouched, only a connector + embedding splice; A and B modify LLM internals",
        lambda r: f"{_fmt_params(r['params_connectors'])} connector, {_fmt_params(r['params_fusion'])} inside the LLM; "
                  f"{_fmt_params(r['params_trainable'])} trained of {_fmt_params(r['params_total'])}",
        lambda rs: _complexity_verdict(rs),
    ),
    (
        "Cost per media token",
        "input-level fusion (C, D) puts every media token through every LLM layer; cross-attention (A) does not",
        lambda r: f"{_slope(r['media_token_cost']) / 1e6:.3f} MFLOP per media token "
                  f"({r['media_token_cost'][0]['media_tokens']} to {r['media_token_cost'][-1]['media_tokens']} tokens)",
        lambda rs: _order_verdict(_by_type(rs, lambda r: _slope(r["media_token_cost"])), "ABCD", "FLOPs per media token"),
    ),
    (
        "Adding a modality",
        "C easy and modular: add an encoder + connector, keep the LLM; A and B need new modules inside the LLM; "
        "D: extend the vocabulary, and train a tokenizer for the modality",
        lambda r: "has every world modality" if r["adds_modality"] is None else (
                  f"+{r['adds_modality']['modality']}: cannot ({r['adds_modality']['error']})" if "error" in r["adds_modality"] else
                  f"+{r['adds_modality']['modality']}: {_fmt_params(r['adds_modality']['new_params'])} new params "
                  f"({_fmt_params(r['adds_modality']['new_params_by_component']['fusion'])} inside the LLM), "
                  f"LLM weights {'changed' if r['adds_modality']['llm_params_changed'] else 'unchanged'}, "
                  f"{r['adds_modality']['config_lines']} config lines"),
        lambda rs: _adding_verdict(rs),
    ),
    (
        "Any-to-any generation",
        "A, B: text out only; C: only with extra modality decoders; D: native",
        lambda r: ", ".join(f"{m}" + (f" ({q['metric']} {q['value']:.3f})" if q and q.get("value") is not None else "")
                            for m, q in r["generates"].items()),
        lambda rs: _generation_verdict(rs),
    ),
    (
        "Text ability after fusion",
        "(no claim in the survey)",
        lambda r: f"perplexity {r['text_ppl_before']:.2f} -> {r['text_ppl_after']:.2f}",
        lambda rs: ("measured only", "text-only perplexity of the LLM on the world's text corpus"),
    ),
]


def _complexity_verdict(records: list[Record]) -> tuple[str, str]:
    c = [r for r in _ok(records) if r["survey_type"] == "C"]
    if not c:
        return "not testable", "no Type-C recipe measured"
    untouched = all(r["params_fusion"] == 0 for r in c)
    return ("agrees" if untouched else "disagrees"), f"Type-C recipes add {'no' if untouched else 'some'} parameters inside the LLM"


def _adding_verdict(records: list[Record]) -> tuple[str, str]:
    ok = [r for r in _ok(records) if r["adds_modality"] is not None and "error" not in r["adds_modality"]]
    c = [r for r in ok if r["survey_type"] == "C"]
    deep = [r for r in ok if r["survey_type"] in ("A", "B")]
    if not c:
        return "not testable", "no Type-C recipe measured"
    c_keeps = all(not r["adds_modality"]["llm_params_changed"] and r["adds_modality"]["new_params_by_component"]["fusion"] == 0 for r in c)
    if not deep:
        return ("agrees" if c_keeps else "disagrees"), "Type-C keeps the LLM as it is; no Type-A/B recipe measured to contrast"
    deep_grows = all(r["adds_modality"]["new_params_by_component"]["fusion"] > 0 or r["adds_modality"]["llm_params_changed"] for r in deep)
    tokenized = [r["adds_modality"]["new_params_by_component"] for r in ok if r["survey_type"] == "D"]
    d_extends = all(new["llm"] > 0 and new.get("codecs", 0) > 0 and new["fusion"] == 0 for new in tokenized)
    detail = "new parameters inside the LLM: C none, A/B " + ("some" if deep_grows else "none")
    if tokenized:
        detail += "; D " + ("new vocabulary rows and a codec" if d_extends else "not only new vocabulary rows and a codec")
    return ("agrees" if c_keeps and deep_grows and d_extends else "disagrees"), detail


def _generation_verdict(records: list[Record]) -> tuple[str, str]:
    ok = _ok(records)
    if not ok:
        return "not testable", "no recipe measured"
    wrong = [r["recipe"] for r in ok if r["survey_type"] in "ABC" and set(r["generates"]) != {"text"}]
    native = [r["recipe"] for r in ok if r["survey_type"] == "D" and len(r["generates"]) < 2]
    if wrong or native:
        return "disagrees", f"unexpected outputs: {wrong + native}"
    return "agrees", "outputs as claimed for the types measured: " + ", ".join(sorted({r["survey_type"] for r in ok}))


def _cell(fn: Callable[[Record], str], r: Record) -> str:
    if "error" in r:
        return "failed"
    try:
        return fn(r)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as err:
        return f"n/a ({type(err).__name__})"


BINDING_KINDS = ("colour", "shape")  # questions that name one object by another attribute


def binding_accuracy(result: dict[str, Any]) -> float | None:
    """Accuracy on the colour and shape questions about scenes of two or more objects, where the
    model must bind the attribute to the object the question names (``None`` without a split)."""
    rows = [row for kind in BINDING_KINDS for n, row in result.get("by_objects", {}).get(kind, {}).items() if int(n) >= 2]
    count = sum(row["count"] for row in rows)
    return sum(row["accuracy"] * row["count"] for row in rows) / count if count else None


def metric_rows(records: list[Record]) -> list[tuple[str, list[str]]]:
    """One row per (task, figure) any record holds: QA accuracy (and choice accuracy, and, on the world's
    scenes, :func:`binding_accuracy`), caption CIDEr-D."""
    keys = sorted({k for r in _ok(records) for k in r.get("metrics", {})})
    rows = []
    for key in keys:
        results = [r.get("metrics", {}).get(key) for r in records]
        sample = next(x for x in results if x)
        figures = ["accuracy", "choice_accuracy"] if "accuracy" in sample else ["cider_d", "bleu4"]
        for figure in figures:
            if figure not in sample:
                continue
            cells = [("-" if x is None else f"{x[figure]:.1%}" if "accuracy" in figure else f"{x[figure]:.3f}") for x in results]
            rows.append((f"{key} {figure.replace('_', ' ')}", cells))
        binding = [None if x is None else binding_accuracy(x) for x in results]
        if any(b is not None for b in binding):
            rows.append((f"{key} colour and shape, 2-3 objects", ["-" if b is None else f"{b:.1%}" for b in binding]))
    return rows


def write_markdown(report: dict[str, Any], path: str | Path) -> str:
    """Write ``report.md``; returns its text."""
    records = report["recipes"]
    settings = report["settings"]
    names = [f"{r['recipe']} ({r.get('survey_type') or '?'})" for r in records]
    lines = [
        "# mmfuse compare",
        "",
        f"Every recipe trained on the same world backbones and data ({report['data']}) with the same budget of "
        f"{settings['budget']} training samples (seed {settings['seed']}), split over its stages in its own proportions; "
        f"evaluation on up to {settings['eval_limit']} samples per task.",
        "",
        "| axis | survey's claim | " + " | ".join(names) + " | measured verdict |",
        "|---|---|" + "---|" * len(records) + "---|",
    ]
    for axis, claim, cell, verdict in AXES:
        v, why = verdict(records)
        lines.append(f"| {axis} | {claim} | " + " | ".join(_cell(cell, r) for r in records) + f" | **{v}**: {why} |")
    lines += ["", "## Task metrics", "", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(records)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in metric_rows(records)]
    lines += ["", "## Budgets and wall time", ""]
    for r in records:
        if "error" in r:
            lines.append(f"- **{r['recipe']}** failed after {r.get('wall_seconds', 0):.0f} s:\n\n```\n{r['error']}\n```")
            continue
        stages = "; ".join(f"{s['name']}: {s['steps']} steps x {s['batch_size']} = {s['samples']} samples on {'+'.join(s['data'])}, "
                           f"training {'+'.join(s['train'])}" for s in r["budget"]["stages"])
        lines.append(f"- **{r['recipe']}**: {r['budget']['samples']} samples ({stages}); training {r['train_seconds']:.0f} s, "
                     f"whole run {r['wall_seconds']:.0f} s")
    lines += ["", "Plots: `learning_curves.png`, `media_token_cost.png`, `params_flops.png`.", ""]
    text = "\n".join(lines)
    Path(path).write_text(text)
    return text


def write_plots(report: dict[str, Any], out: str | Path) -> list[Path]:
    """Learning curves, cost against media tokens, parameters and FLOPs by type; returns the paths."""
    out = Path(out)
    records = _ok(report["recipes"])
    paths = [out / "learning_curves.png", out / "media_token_cost.png", out / "params_flops.png"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        ax.plot([p["samples"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker=TYPE_MARKERS.get(r["survey_type"], "o"),
                label=f"{r['recipe']} ({r['survey_type']}): {r['curve_task']}")
    ax.set(title="Learning curves: QA accuracy against training samples seen", xlabel="training samples seen",
           ylabel="validation accuracy", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        cost = r["media_token_cost"]
        ax.plot([c["media_tokens"] for c in cost], [c["train_flops"] / 1e9 for c in cost], marker=TYPE_MARKERS.get(r["survey_type"], "o"),
                label=f"{r['recipe']} ({r['survey_type']})")
    ax.set(title="Training cost of one sample against its media tokens", xlabel="media tokens per sample",
           ylabel="train GFLOP per sample (fwd + bwd)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{r['recipe']}\n({r['survey_type']})" for r in records]
    colours = [TYPE_COLOURS.get(r["survey_type"], "grey") for r in records]
    xs = range(len(records))
    left.bar([x - 0.2 for x in xs], [r["params_total"] / 1e6 for r in records], width=0.4, color=colours, alpha=0.4, label="total")
    left.bar([x + 0.2 for x in xs], [r["params_trainable"] / 1e6 for r in records], width=0.4, color=colours, label="trained")
    left.set(title="Parameters by recipe (colour: survey type)", ylabel="millions", xticks=list(xs), xticklabels=names)
    left.legend(fontsize=7)
    right.bar(list(xs), [r["train_flops_per_sample"] / 1e9 for r in records], color=colours)
    right.set(title="Training FLOPs per sample by recipe", ylabel="GFLOP (fwd + bwd)", xticks=list(xs), xticklabels=names)
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
