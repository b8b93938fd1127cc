"""`fashionfuse report RUN_DIR`: one self-contained HTML page and its Markdown twin.

Sections, each from the run dir's own artifacts (a missing stage is said, not guessed): a
summary; the eval table and chart; the ablation table when there is one; the search (best
weights and score, the landscape and best-so-far plot, the best trials); training (per adapter:
steps, loss, tokens/s, attention, LoRA targets, the training and validation loss curves); curation (Table 1, the funnel
per dataset, a warning wherever one filter dropped most of a dataset); versions and stage
timings; the resolved config (collapsed). Images are embedded as data URIs in `report.html`,
so the page can be mailed; `report.md` links the same PNG files.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from ..fusion import OPERATOR_PARAMS
from ..rundir import RunLayout, read_manifest, write_text


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


class _Page:
    """Builds the HTML and Markdown versions side by side."""

    def __init__(self, root: Path):
        self.root, self.html, self.md = root, [], []

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level} id='{text.lower().replace(' ', '-')}'>{html.escape(text)}"
                         f"</h{level}>")
        self.md.append(f"{'#' * level} {text}\n")

    def para(self, text: str, cls: str = "") -> None:
        attr = f" class='{cls}'" if cls else ""
        self.html.append(f"<p{attr}>{html.escape(text)}</p>")
        self.md.append(("> **warning:** " if cls == "warning" else "") + text + "\n")

    def pre(self, text: str, summary: str | None = None) -> None:
        block = f"<pre>{html.escape(text)}</pre>"
        self.html.append(f"<details><summary>{html.escape(summary)}</summary>{block}</details>"
                         if summary else block)
        self.md.append(f"```\n{text.rstrip()}\n```\n")

    def bullets(self, items: list[str]) -> None:
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        self.md.append("".join(f"* {i}\n" for i in items))

    def table(self, headers: list[str], rows: list[list], bold: set[tuple[int, int]] = ()) -> None:
        def cell(v, r, c):
            text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            return f"<b>{html.escape(text)}</b>" if (r, c) in bold else html.escape(text)

        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{cell(v, r, c)}</td>" for c, v in enumerate(row))
                       + "</tr>" for r, row in enumerate(rows))
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        md_rows = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md_rows += ["| " + " | ".join((f"**{cell(v, r, c)}**" if (r, c) in bold else cell(v, r, c))
                                      for c, v in enumerate(row)) + " |"
                    for r, row in enumerate(rows)]
        self.md.append("\n".join(md_rows) + "\n")

    def image(self, path: Path, alt: str) -> None:
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>")
        self.md.append(f"![{alt}]({path.relative_to(self.root)})\n")


def _curation(page: _Page, layout: RunLayout) -> None:
    page.heading("Curation")
    table1 = _json(layout.root / "curate" / "table1.json")
    if not table1:
        page.para("not curated yet")
        return
    page.table(["dataset", "type", "instances", "avg. turns", "avg. len. (words)", "train",
                "validation"],
               [[n, s["kind"], s["instances"], s["avg_turns"], s["avg_response_words"],
                 s["train"], s["validation"]] for n, s in table1.items()])
    for name in table1:
        stats = _json(layout.curated(name) / "stats.json") or table1[name]
        funnel = stats.get("funnel", {})
        page.para(f"{name}: " + ", ".join(f"{k} {v}" for k, v in funnel.items()))
        for line in stats.get("warnings", []):
            page.para(line, cls="warning")


def _training(page: _Page, layout: RunLayout) -> None:
    page.heading("Training")
    rows, plots = [], []
    for d in sorted((layout.root / "adapters").glob("*/manifest.json")):
        m = json.loads(d.read_text())["metrics"]
        rows.append([d.parent.name, m.get("steps"), m.get("first_loss"), m.get("final_loss"),
                     m.get("val_loss"),
                     round(m["real_tokens"] / m["train_seconds"]) if m.get("train_seconds") else None,
                     m.get("attention") or "unpacked", ", ".join(m.get("target_modules") or [])])
        if (d.parent / "loss.png").is_file():
            plots.append(d.parent / "loss.png")
    if not rows:
        page.para("no adapter trained yet")
        return
    page.table(["adapter", "steps", "first loss", "final loss", "validation loss", "tokens/s",
                "attention", "LoRA targets"], rows)
    for p in plots:
        page.image(p, f"training and validation loss of {p.parent.name}")


def _search(page: _Page, layout: RunLayout) -> None:
    page.heading("Search")
    best = _json(layout.search / "best.json")
    if not best:
        page.para("no search yet")
        return
    how = f"operator {best.get('operator', 'sum')}, granularity {best.get('granularity', 'adapter')}"
    page.para(f"method {best['method']}, objective {best['objective']}, {how}: best "
              f"{best['best_weights']} -> {best['best_score']:.4f} ({best['n_trials']} trials, "
              f"{best.get('n_pruned', 0)} pruned)")
    if (layout.search / "search.png").is_file():
        page.image(layout.search / "search.png", "search landscape and best so far")
    trials = sorted(_json(layout.search / "trials.json") or [], key=lambda t: t["score"])[:10]
    names = list(best["best_weights"])[:12]  # layer-wise searches have many: the first 12
    extra = [k for k in ("density", *OPERATOR_PARAMS) if trials and k in trials[0]]
    page.table(["trial", *[f"w[{n}]" for n in names], *extra, "score"],
               [[t["number"], *[t["weights"].get(n) for n in names], *[t[k] for k in extra],
                 t["score"]] for t in trials])


def _scores(page: _Page, title: str, folder: Path, extra: str | None = None) -> None:
    page.heading(title)
    table = _json(folder / "table.json")
    if not table:
        page.para("not evaluated yet")
        return
    cols = table["columns"] + ([] if "average" in table["columns"] else ["average"])
    key = [c for c in cols if c in table.get("summary", ["average"]) or c.endswith(" sd")]
    cols = key + [c for c in cols if c not in key]  # the answer's columns first, then tasks
    headers = ["model", *cols] + ([extra] if extra else [])
    extra = extra and extra.replace(" ", "_")
    def signed(v):
        return None if v is None else f"{v:+.2f}"

    rows = [[r["model"], *[r[c] for c in cols]] + ([signed(r.get(extra))] if extra else [])
            for r in table["rows"]]
    bold = {(i, 1 + j) for j, c in enumerate(cols) for i, r in enumerate(table["rows"])
            if r["model"] in table["best"].get(c, [])}
    page.table(headers, rows, bold)
    if (folder / "table.png").is_file():
        page.image(folder / "table.png", title)


def _provenance(page: _Page, layout: RunLayout) -> None:
    page.heading("Versions and timings")
    stages = [("curate", p) for p in sorted((layout.root / "curate").glob("*/manifest.json"))]
    stages += [("train", p) for p in sorted((layout.root / "adapters").glob("*/manifest.json"))]
    stages += [(s, getattr(layout, s) / "manifest.json") for s in ("search", "eval")]
    rows, versions = [], {}
    for stage, path in stages:
        m = read_manifest(path.parent)
        if m:
            versions = m.get("versions", versions)
            rows.append([stage, path.parent.name,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_unix"])),
                         m["metrics"].get("train_seconds"), m["fingerprint"]])
    page.table(["stage", "artifact", "finished", "train seconds", "fingerprint"], rows)
    page.para("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


# a readable column: at most ~100 characters a line, margins on narrow windows, wide tables
# scrolling inside their own box instead of widening the page, figures no wider than the text,
# long paths in headings and text broken anywhere rather than pushing the page wider
CSS = ("body{font-family:system-ui,sans-serif;max-width:62rem;margin:2em auto;padding:0 1.5rem;"
       "line-height:1.5;color:#222}h2{margin-top:2em;border-bottom:1px solid #ddd}"
       "h1,h2,h3,p,li{overflow-wrap:anywhere}"
       "table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto;"
       "max-width:100%;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right;white-space:nowrap}td:first-child,th:first-child{text-align:left}"
       "img{max-width:100%;height:auto;display:block;margin:1em 0}"
       "pre{background:#f6f6f6;padding:1em;overflow:auto}.warning{background:#fff3cd;"
       "padding:.4em;border-left:4px solid #e0a800}")


def _summary(page: _Page, layout: RunLayout) -> None:
    """The answer first: data kept, adapters, the fusion found, the best model."""
    page.heading("Summary")
    items = []
    table1 = _json(layout.root / "curate" / "table1.json") or {}
    if table1:
        items.append("curated: " + ", ".join(f"{n} {s['instances']}" for n, s in table1.items()))
    warnings = sum(len((_json(layout.curated(n) / "stats.json") or {}).get("warnings", []))
                   for n in table1)
    if warnings:
        items.append(f"{warnings} curation warning(s): see Curation")
    adapters = sorted(p.parent.name for p in (layout.root / "adapters").glob("*/manifest.json"))
    if adapters:
        items.append("adapters: " + ", ".join(adapters))
    best = _json(layout.search / "best.json")
    if best:
        items.append(f"fusion ({best['method']}): {best['best_weights']}, "
                     f"{best['objective']} {best['best_score']:.4f}")
    for title, folder in (("eval", layout.eval), ("ablation", layout.ablation())):
        table = _json(folder / "table.json")
        if table:
            top = max(table["rows"], key=lambda r: r["average"] or 0.0)
            items.append(f"best {title} average: {top['model']} ({top['average']:.2f})")
    page.bullets(items or ["nothing built yet"])


def verdict_lines(run_dir: str | Path) -> list[str]:
    """The run's ablation verdict as read (paper comparisons, then retention); [] without one."""
    from .verdict import shown_lines

    lines = (_json(RunLayout(run_dir).ablation() / "table.json") or {}).get("verdict") or []
    return shown_lines(lines) if lines else []


def _verdict(page: _Page, layout: RunLayout) -> None:
    """The ablation's comparisons with their intervals, before anything else."""
    lines = verdict_lines(layout.root)
    if lines:
        page.heading("Verdict")
        page.para("Differences in points, each with its 95 % paired-bootstrap interval over the "
                  "same items; \"cannot be told apart\" where the interval holds 0.")
        page.bullets(lines)


def _usage(page: _Page, layout: RunLayout) -> None:
    """How to load the fused adapter (PEFT, lm-eval) and where the exports are."""
    if not (layout.fused / "adapter_config.json").is_file():
        return
    page.heading("Use the fused adapter")
    page.pre("from peft import AutoPeftModelForCausalLM\n"
             f"model = AutoPeftModelForCausalLM.from_pretrained({str(layout.fused)!r})\n\n"
             f"# lm_eval --model hf --model_args pretrained=BASE,peft={layout.fused}\n"
             "# fashionfuse export CONFIG   (GGUF LoRA for llama.cpp / Ollama, vLLM, merged GGUF)")


def write_report(run_dir: str | Path) -> Path:
    """Write `report.html` and `report.md` into the run dir; return the HTML path."""
    layout = RunLayout(run_dir)
    page = _Page(layout.root)
    page.heading(f"fashionfuse run: {layout.root}", 1)
    _verdict(page, layout)
    _summary(page, layout)
    _usage(page, layout)
    _scores(page, "Evaluation", layout.eval)
    if (layout.ablation() / "table.json").is_file():
        _scores(page, "Ablation", layout.ablation(), extra="vs best single")
    _search(page, layout)
    _training(page, layout)
    _curation(page, layout)
    _provenance(page, layout)
    page.heading("Config")
    config = layout.resolved_config
    page.pre(config.read_text() if config.is_file() else "(no resolved config)",
             summary="the resolved config (every default filled in)")
    html_page = ("<!doctype html><html><head><meta charset='utf-8'><title>fashionfuse report"
                 f"</title><style>{CSS}</style></head><body>{''.join(page.html)}</body></html>")
    write_text(layout.root / "report.html", html_page)
    write_text(layout.root / "report.md", "\n".join(page.md))
    return layout.root / "report.html"
