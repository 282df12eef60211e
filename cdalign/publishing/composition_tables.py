"""Markdown tables of composition reports (METHOD.md §2): AND (``ConstrainedComposer``'s
report: KL per component, pairwise KL, rewards), concept sets, OR (the mixture's losses and
support masses) and the 2D toy experiments. Pure functions of the plain ``report.json``
dicts; the composition code that writes those reports calls them."""

from __future__ import annotations

from cdalign.publishing.tables import format_ci, md

# What a chain-KL number is, per estimator (cdalign.core.kl).
KL_UNITS = {"path": "exact chain KL, nats per image", "uniform": "the paper code's mean squared ε̃ difference per step"}
# The models a concept-set run compares, in table order, and how the table names them.
CONCEPT_LABELS = {"equal_weights": "equal weights", "constrained": "constrained", "joint_prompt": "joint prompt"}


def reward_table(report: dict) -> str:
    """Markdown table: each component's own reward (mean [95% CI]) on every model's
    evaluation images, beside the component alone; and the minimum over components."""
    rewards = report.get("rewards")
    if not rewards:
        return ""
    keys = list(report["models"])
    names = [n for n in report["components"] if n in rewards]
    head = "| reward of component | component alone | " + " | ".join(report["models"][k]["label"] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for n in names:
        r = rewards[n]
        alone = format_ci(r["component_alone"], r["component_alone_ci95"], ".3f")
        cells = [format_ci(r[k]["mean"], r[k]["ci95"], ".3f") for k in keys]
        lines.append(f"| {n} ({r['reward']}) | {alone} | " + " | ".join(cells) + " |")
    low = rewards.get("min_over_components")
    if low:
        cells = [format_ci(low[k]["mean"], low[k]["ci95"], ".3f") for k in keys]
        lines.append("| min over components, per image | – | " + " | ".join(cells) + " |")
    n_img = report.get("num_eval_images")
    lines.append(f"\n{n_img} evaluation images per model, the same (prompt, seed) items for every model; raw reward values, "
                 "mean [95% CI over images].")
    return "\n".join(lines)


def kl_table(report: dict) -> str:
    """Markdown table: one row per model (equal, constrained, distilled, joint prompt):
    weights, KL to each component (mean [95% CI] over the evaluation images) and the max."""
    names = report["components"]
    head = "| model | " + " | ".join(f"w_{n}" for n in names) + " | " + " | ".join(f"KL(p‖{n})" for n in names) + " | max KL |"
    lines = [head, "|" + "---|" * (2 * len(names) + 2)]
    for key, m in report["models"].items():
        w = m["weights"]
        ws = " | ".join(f"{w[n]:.3f}" if w else "–" for n in names)
        ks = " | ".join(format_ci(m["kl"][n]["mean"], m["kl"][n]["ci95"], ".3g") for n in names)
        lines.append(f"| {m['label']} | {ws} | {ks} | {m['max_kl']:.3g} |")
    estimator = report.get("kl_estimator")
    lines.append(f"\nKL along each model's own sampling path ({estimator}: {KL_UNITS.get(estimator, estimator)}), "
                 f"mean [95% CI] over {report.get('num_eval_images')} evaluation images.")
    d = report.get("max_kl_difference")
    if d:
        lo, hi = d["ci95"]
        verdict = "lower" if hi < 0 else ("higher" if lo > 0 else "not distinguishable")
        lines.append(f"Max KL, constrained − equal weights: {format_ci(d['mean'], d['ci95'], '+.3g')} ({d['method']}): "
                     f"the constrained weights' max KL is {verdict}.")
    return "\n".join(lines)


def pairwise_table(report: dict) -> str:
    """Markdown: KL from each component sampled alone (row) to every component (column),
    i.e. how far apart the components are; '' when the report has none."""
    pairs = report.get("pairwise_kl")
    if not pairs:
        return ""
    names = report["components"]
    lines = ["| sampled alone \\ KL to | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{pairs[a][b]:.3g}" for b in names) + " |")
    return "\n".join(lines)


def concept_table(report: dict) -> str:
    """Markdown: per set the learned weights and each model's concept minimum, then the
    pooled means with 95% CIs and the paired differences."""
    models = [m for m in CONCEPT_LABELS if m in report["pooled"]]
    names = report["concepts"]
    head = ("| set (concept prompts) | joint prompt | weights (" + ", ".join(names) + ") | "
            + " | ".join(CONCEPT_LABELS[m] for m in models) + " |")
    lines = [head, "|" + "---|" * (len(models) + 3)]
    for s in report["sets"]:
        w = ", ".join(f"{s['weights'][n]:.2f}" for n in names)
        cells = " | ".join(format_ci(s["min_over_concepts"][m]["mean"], s["min_over_concepts"][m]["ci95"], ".3f")
                           for m in models)
        lines.append(f"| {md(' + '.join(s['prompts']))} | {md(s['joint_prompt'] or '–')} | {w} | {cells} |")
    cells = " | ".join(format_ci(report["pooled"][m]["mean"], report["pooled"][m]["ci95"], ".3f") for m in models)
    n = sum(1 for _ in report["sets"]) * report["num_eval_images_per_set"]
    lines.append(f"| **pooled** ({n} images) | | | {cells} |")
    lines.append("")
    lines.append(f"Score: {report['score']}; mean [95% CI]. Paired over the same images:")
    for k, d in report["paired_differences"].items():
        lines.append(f"- {k}: {format_ci(d['mean'], d['ci95'])}")
    return "\n".join(lines)


def mass_table(report: dict) -> str:
    """Markdown: the mass in each dataset's support (base, trained mixture, the exact
    min-max answer for disjoint supports); '' when the run did not count masses."""
    m = report.get("masses")
    if not m:
        return ""
    names = report["datasets"]
    lines = ["| model | " + " | ".join(f"mass in {n}" for n in names) + " | outside every support |",
             "|" + "---|" * (len(names) + 2)]
    for model in ("base", "mixture"):
        e = m[model]
        cells = [format_ci(e[n]["mass"], e[n]["ci95"], ".3f") for n in names]
        o = e["outside_every_support"]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {format_ci(o['mass'], o['ci95'], '.3f')} |")
    lines.append("| exact min-max (disjoint supports) | " + " | ".join(f"{m['min_max_answer'][n]:.3f}" for n in names) + " | 0 |")
    lines.append(f"\n{m['n']} images per model, prompt {m['prompt']!r}, the same seeds; a sample's cell "
                 f"({', '.join(m['cells'])}) read by the '{m['labeler']}' labeler; mean [95% CI]. Loss: {report['loss']}.")
    return "\n".join(lines)


def loss_table(report: dict) -> str:
    """Markdown table: per dataset its weight, loss, (excess) divergence, threshold."""
    lines = ["| dataset | weight | DSM loss | irreducible | divergence | threshold | ok |", "|---|---|---|---|---|---|---|"]
    for n in report["datasets"]:
        r = report["per_dataset"][n]
        irr = report["irreducible_loss"][n] if report["irreducible_loss"] else float("nan")
        ok = "–" if r["satisfied"] is None else ("yes" if r["satisfied"] else "NO")
        thr = "–" if r["threshold"] is None else f"{r['threshold']:.4g}"
        lines.append(f"| {n} | {report['weights'][n]:.3f} | {r['loss']:.4g} | {irr:.4g} | {r['divergence']:.4g} | {thr} | {ok} |")
    return "\n".join(lines)


def toy2d_table(results: dict) -> str:
    """Markdown of the 2D experiments (``recipes/toy2d.py``): AND, per weighting its weights,
    the exact KL to each component, the max, the chain-KL estimate and the sample mean; OR,
    per weighting its weights, the sampled mode masses and the forward KLs."""
    out = []
    a = results["and"]
    names = a["components"]
    out.append("## AND (product, reverse KL)\n")
    out.append("| weights | " + " | ".join(f"μ_{n}" for n in names) + " | " + " | ".join(f"KL(p‖{n})" for n in names)
               + " | max KL | max chain KL | sample mean |")
    out.append("|" + "---|" * (2 * len(names) + 4))
    for label, r in a["rows"].items():
        out.append(f"| {label} | " + " | ".join(f"{r['weights'][n]:.3f}" for n in names) + " | "
                   + " | ".join(f"{r['kl'][n]:.4f}" for n in names)
                   + f" | **{r['max_kl']:.4f}** | {r['max_chain_kl']:.3f} | ({r['sample_mean'][0]:+.3f}, {r['sample_mean'][1]:+.3f}) |")
    out.append("\nKL columns: exact KL of the product density Π q_i^μ_i/Z to each true component density, on the grid. "
               "Chain KL: the method's estimate along the composed sampler's path, from the trained score models.\n")
    o = results["or"]
    names = o["datasets"]
    out.append("## OR (mixture, forward KL)\n")
    out.append("| training weights | " + " | ".join(f"μ_{n}" for n in names) + " | masses A, B+, B− (sampled) | "
               + " | ".join(f"KL({n}‖p_μ)" for n in names) + " | max KL | max KL at sampled masses |")
    out.append("|" + "---|" * (2 * len(names) + 4))
    for label, r in o["rows"].items():
        m = list(r["mode_masses"].values())
        out.append(f"| {label} | " + " | ".join(f"{r['weights'][n]:.3f}" for n in names)
                   + f" | {m[0]:.2f}, {m[1]:.2f}, {m[2]:.2f} | " + " | ".join(f"{r['kl'][n]:.4f}" for n in names)
                   + f" | **{r['max_kl']:.4f}** | {r.get('max_kl_of_sampled_masses', float('nan')):.4f} |")
    out.append("\nIrreducible DSM loss per dataset (model fitted on it alone): "
               + ", ".join(f"{k} {v:.4f}" for k, v in o["irreducible_loss"].items()) + ".\n")
    return "\n".join(out)
