"""The report's two renderings of the same content: ``report.md`` (images linked) and ``report.html``
(self-contained: every image embedded as a base64 data URI, so the file opens from anywhere)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from study.report import COLUMNS, Study
from trainables.task import as_task

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #bbb;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#eef}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
figure{margin:1em 0}figcaption{font-size:13px;color:#555}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
.muted{color:#777}#verdict{border:2px solid #446;padding:.2em 1em;background:#f7f8ff}
.verdict{font-size:15px;line-height:1.45}.warning{font-size:15px;color:#8a1c00;font-weight:600}"""
# Sets body[data-images] to "loaded" when every <img> decoded (naturalWidth > 0), else "broken: N".
_SCRIPT = """window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0)});
document.body.setAttribute('data-images',bad.length?'broken: '+bad.length:'loaded');
document.body.setAttribute('data-image-count',String(imgs.length));
document.getElementById('image-status').textContent=imgs.length+' figure(s), '+(imgs.length-bad.length)+' loaded';});"""


def _counts(study: Study) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in study.cells:
        for k, v in c.counts.items():
            total[k] = total.get(k, 0) + v
    return total


def _heading(study: Study) -> list[str]:
    counts = _counts(study)
    done = sum(c.best is not None for c in study.cells)
    trials = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items())) or "none"
    task = as_task(study.task)
    return [
        f"Task: {task.name} ({task.description or 'no description'}); selection score = {task.score_text()}",
        f"Study folder: {study.folder}",
        f"MLflow: {study.tracking_uri}, parent run {study.parent_run_id}",
        f"Cells: {len(study.cells)} ({done} with a finished trial); fine-tuning trials: {trials}",
        "Best trial of a cell: the completed search-phase fine-tuning run with the highest final validation "
        "score; with repeats of its configuration (seed re-runs or a race's), mean ± sample std over it and its "
        "repeats. Test metrics are on the test split.",
    ]


def _pivot(study: Study, backbone: str) -> tuple[list[str], list[str], dict[tuple[str, str], list[str]]]:
    cells = [c for c in study.cells if c.backbone == backbone]
    methods = list(dict.fromkeys(c.row for c in cells))
    strategies = list(dict.fromkeys(c.strategy for c in cells))
    body = {(c.row, c.strategy): [f"{COLUMNS[k][0]} {c.text(k)}" for k in COLUMNS] for c in cells}
    return methods, strategies, body


def _long_rows(study: Study) -> tuple[list[str], list[list[str]]]:
    head = ["cell", "score", *(COLUMNS[k][0] for k in COLUMNS), "trials", "registered model", "best run"]
    rows = []
    for c in study.cells:
        score = f"{c.best.data.metrics['score']:.3f}" if c.best else "–"
        trials = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(c.counts.items())) or "none"
        model = f"{c.registered}@best (v{c.version})" if c.registered else "–"
        rows.append([c.id, score, *(c.text(k) for k in COLUMNS), trials, model,
                     c.best.info.run_id if c.best else "–"])
    return head, rows


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ci_text(stats: dict, metric: str) -> str:
    lo, hi = stats["ci"][metric]
    est = stats["estimate"][metric]
    if not _is_number(est):
        return "–"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]" if _is_number(lo) and _is_number(hi) else f"{est:.3f}"


RANKING_NOTE = ("Exploratory: test figures measured after the choice on validation (the chosen cell's is optimistic; "
                "its confirmation is the verdict's). Rank: on the mean test score over every run, with its 95% "
                "bootstrap interval (subjects resampled, each cell's mean moved by its between-run variation).")


def _ranking(data: dict) -> tuple[list[str], list[list[str]]]:
    """Cells by test score with intervals, rank intervals, validation means and the difference from the reference."""
    head = ["cell", "rank [95% interval]", "validation score (repeats)", "test score [95% CI]", "Dice [95% CI]",
            "AUC [95% CI]", "Δ score vs reference [95% CI]"]
    selection = data.get("selection") or {"means": {}, "runs": {}}
    rows = []
    ranked = sorted((c for c in data["cells"] if c.get("statistics")),
                    key=lambda c: -(c["statistics"]["estimate"]["score"] if _is_number(c["statistics"]["estimate"]["score"])
                                    else -1.0))
    for c in ranked:
        st = c["statistics"]
        ref = st["vs_reference"].get("score")
        if ref:
            lo, hi = ref["ci"]
            delta = (f"{ref['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if _is_number(lo) and _is_number(hi)
                     else f"{ref['difference']:+.3f}" if _is_number(ref["difference"]) else "–")
        else:
            delta = "reference" if c["cell"] == data["verdict"]["reference"] else "–"
        rank = c.get("rank")
        rank_text = f"{rank['rank']} [{rank['ci'][0]}, {rank['ci'][1]}]" if rank else "–"
        mean = selection["means"].get(c["cell"])
        val = f"{mean:.3f} ({selection['runs'].get(c['cell'], 0)})" if _is_number(mean) else "–"
        name = c["cell"] + (" (did not learn)" if c.get("learned") is False else "")
        rows.append([name, rank_text, val, _ci_text(st, "score"), _ci_text(st, "dice"), _ci_text(st, "auc"),
                     delta])
    return head, rows


_RACE_HEAD = ["cell", "outcome", "Δ validation score, better cell − this (threshold)", "level α_t",
              "test score [95% CI]", "repeats (MLflow runs)"]


def _race_rows(race: dict) -> list[list[str]]:
    """One row per cell of the race: when it was eliminated and on what evidence, or that it survived."""
    rows = []
    for r in race["cells"]:
        outcome = (f"eliminated after {'the search' if r['round'] == 0 else 'round ' + str(r['round'])}"
                   if r["outcome"] == "eliminated" else r["outcome"]) + (f" ({r['reason']})" if r.get("reason") else "")
        diff = (f"{r['difference']:+.3f} (> {r['threshold']:.3f}, by {r['by']})" if _is_number(r.get("difference"))
                and _is_number(r.get("threshold")) else f"{r['difference']:+.3f}" if _is_number(r.get("difference"))
                else "–")
        p = f"{r['alpha']:.2g}" if _is_number(r.get("alpha")) else "–"
        score = r.get("test_score_ci")
        score = (f"{r['test_score']:.3f} [{score[0]:.3f}, {score[1]:.3f}]" if score and _is_number(r.get("test_score"))
                 and _is_number(score[0]) and _is_number(score[1]) else "–")
        rows.append([r["cell"], outcome, diff, p, score, f"{r['repeats']} ({r['repeats_in_mlflow']})"])
    return rows


def _race_lines(race: dict) -> list[str]:
    lines = [race["text"]]
    if race["failed"]:
        lines.append("Failed repeats (excluded): " + "; ".join(f"{f['cell']} in round {f['round']}: {f['reason']}"
                                                               for f in race["failed"]))
    if race["cells_whose_mlflow_repeats_differ"]:
        lines.append("Warning: MLflow holds another number of race repeats than the race's record for "
                     + ", ".join(race["cells_whose_mlflow_repeats_differ"]))
    return lines


_REMAP_HEAD = ["model", "cell", "test score [95% CI]", "student − this [95% CI]", "parameters", "storage",
               "s/volume (predict)", "s/epoch (train)", "peak MB (train)"]


def _remap_rows(data: dict) -> list[list[str]]:
    """One row per model of each distillation cell: the student, its teacher and its label-only twin."""
    def num(x: object, fmt: str) -> str:
        return fmt.format(x) if _is_number(x) else "–"

    rows = []
    for entry in data.get("remapping") or []:
        for r in entry["rows"]:
            ci = r.get("ci") or [None, None]
            score = (f"{r['test_score']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if _is_number(ci[0]) and _is_number(ci[1])
                     else num(r.get("test_score"), "{:.3f}"))
            d = r.get("student_minus_this")
            diff = (f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d and _is_number(d["ci"][0])
                    else "–")
            storage = r.get("task_storage_bytes")
            rows.append([r["role"], r["cell"], score, diff, num(r.get("params"), "{:,.0f}"),
                         f"{storage / 2**20:.2f} MB" if _is_number(storage) else "–",
                         num(r.get("seconds_per_volume"), "{:.4f}"), num(r.get("time_per_epoch_s"), "{:.2f}"),
                         num(r.get("peak_memory_mb"), "{:.0f}")])
    return rows


_REMAP_TEXT = ("Remapping (distillation): each distilled student next to the teacher it learned from and its twin "
               "trained on the labels alone; the difference is paired over the test subjects.")


def _claim_rows(data: dict) -> list[list[str]]:
    return [[c["claim"], f"{c['status']} ({c.get('kind', 'exploratory')})", c["evidence"]] for c in data["claims"]]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows] + [""]


def render_markdown(study: Study, data: dict, figures: list[tuple[str, Path]], importance: dict[str, Path],
                    importance_notes: list[str], notes: list[str], configs: Path, out: Path) -> str:
    """``report.md``: the verdict first, then the evidence; image links are relative to ``out``."""
    md = [f"# Study report: {study.experiment}", "", "## Verdict", ""]
    md += [line + "\n" for line in data["verdict"]["text"]]
    forest, rest = figures[0], figures[1:]
    md += [f"![{forest[0]}]({forest[1].relative_to(out).as_posix()})", ""]
    md += ["## Ranking with confidence intervals", "", RANKING_NOTE, ""] + _md_table(*_ranking(data))
    if data.get("race"):
        md += ["## The race", "", *(line + "\n" for line in _race_lines(data["race"]))]
        md += _md_table(_RACE_HEAD, _race_rows(data["race"]))
    if data.get("remapping"):
        md += ["## Remapping: distillation into a smaller student", "", _REMAP_TEXT, ""]
        md += _md_table(_REMAP_HEAD, _remap_rows(data))
    md += ["## The source study's findings, tested", ""]
    md += _md_table(["finding (arXiv 2405.19204)", "here", "evidence"], _claim_rows(data))
    md += ["## The study", "", *(f"- {line}" for line in _heading(study)), ""]
    for backbone in dict.fromkeys(c.backbone for c in study.cells):
        methods, strategies, body = _pivot(study, backbone)
        md += [f"## Backbone {backbone}", ""]
        md += _md_table(["pre-training \\ strategy", *strategies],
                        [[m, *("<br>".join(body.get((m, s), ["–"])) for s in strategies)] for m in methods])
    md += ["## All cells", ""] + _md_table(*_long_rows(study))
    md += ["## Figures", ""] + [f"![{t}]({p.relative_to(out).as_posix()})\n" for t, p in rest]
    md += ["## Hyperparameter importances (PED-ANOVA)", ""]
    md += [f"![{c}]({p.relative_to(out).as_posix()})\n" for c, p in importance.items()]
    md += [f"- {n}" for n in importance_notes] + [""]
    md += [f"## Failed trials ({len(study.failed)})", ""]
    if study.failed:
        md += _md_table(["stage", "cell", "trial", "reason"],
                        [[f["stage"], f["cell"], f["trial_id"], f["reason"]] for f in study.failed])
    md += ["## Best configurations", "", f"Re-run: `python -m study.launch --grid {configs}`", "", "```yaml",
           configs.read_text().rstrip(), "```", ""]
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(md)


def _html_table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    def cell(x: str) -> str:
        return x if raw else html.escape(str(x))

    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _img(title: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def render_html(study: Study, data: dict, figures: list[tuple[str, Path]], importance: dict[str, Path],
                importance_notes: list[str], notes: list[str], configs: Path) -> str:
    """``report.html``: the same content as the markdown, verdict first, every image embedded."""
    title = f"Study report: {study.experiment}"
    forest, rest = figures[0], figures[1:]
    warning = [x for x in data["verdict"]["text"] if x.startswith("Warning:")]
    parts = [f"<h1>{html.escape(title)}</h1>",
             '<section id="verdict"><h2>Verdict</h2>'
             + "".join(f'<p class="{"warning" if x in warning else "verdict"}">{html.escape(x)}</p>'
                       for x in data["verdict"]["text"]) + _img(forest[0], forest[1]) + "</section>",
             "<h2>Ranking with confidence intervals</h2>" + f"<p>{html.escape(RANKING_NOTE)}</p>"
             + _html_table(*_ranking(data)),
             *(['<section id="race"><h2>The race</h2>'
                + "".join(f"<p>{html.escape(x)}</p>" for x in _race_lines(data["race"]))
                + _html_table(_RACE_HEAD, _race_rows(data["race"])) + "</section>"] if data.get("race") else []),
             *(['<section id="remapping"><h2>Remapping: distillation into a smaller student</h2>'
                f"<p>{html.escape(_REMAP_TEXT)}</p>" + _html_table(_REMAP_HEAD, _remap_rows(data)) + "</section>"]
               if data.get("remapping") else []),
             "<h2>The source study's findings, tested</h2>"
             + _html_table(["finding (arXiv 2405.19204)", "here", "evidence"], _claim_rows(data)),
             "<h2>The study</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in _heading(study)) + "</ul>",
             '<p id="image-status" class="muted"></p>']
    for backbone in dict.fromkeys(c.backbone for c in study.cells):
        methods, strategies, body = _pivot(study, backbone)
        rows = [[html.escape(m), *("<br>".join(html.escape(x) for x in body.get((m, s), ["–"])) for s in strategies)]
                for m in methods]
        parts.append(f"<h2>Backbone {html.escape(backbone)}</h2>"
                     + _html_table(["pre-training \\ strategy", *strategies], rows, raw=True))
    parts.append("<h2>All cells</h2>" + _html_table(*_long_rows(study)))
    parts.append("<h2>Figures</h2>" + "".join(_img(t, p) for t, p in rest))
    parts.append("<h2>Hyperparameter importances (PED-ANOVA)</h2>"
                 + "".join(_img(c, p) for c, p in importance.items())
                 + "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in importance_notes) + "</ul>")
    parts.append(f"<h2>Failed trials ({len(study.failed)})</h2>" + (_html_table(
        ["stage", "cell", "trial", "reason"], [[f["stage"], f["cell"], f["trial_id"], f["reason"]]
                                               for f in study.failed]) if study.failed else "<p>none</p>"))
    parts.append(f"<h2>Best configurations</h2><p>Re-run: <code>python -m study.launch --grid "
                 f"{html.escape(str(configs))}</code></p><pre>{html.escape(configs.read_text())}</pre>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>" + "\n".join(parts) + "</body></html>\n")
