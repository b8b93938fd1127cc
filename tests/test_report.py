"""`fashionfuse report`: one self-contained page (and a Markdown twin) from a run's artifacts."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fashionfuse.cli import app

runner = CliRunner()
SECTIONS = ["Summary", "Use the fused adapter", "Evaluation", "Search", "Training", "Curation",
            "Versions and timings", "Config"]


@pytest.fixture
def report_run(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert f"report: {run / 'report.html'}" in result.output
    return run


def test_report_renders_every_section_with_valid_images(report_run):
    from PIL import Image

    page = (report_run / "report.html").read_text()
    md = (report_run / "report.md").read_text()
    for section in SECTIONS:
        assert f">{section}</h2>" in page and f"## {section}" in md
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) >= 4  # eval chart, search plot, a loss curve per adapter
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()  # a valid PNG
    assert "src='http" not in page and "src=\"http" not in page  # nothing fetched: mailable
    assert "adapter:chat" in page and "fused" in page  # the eval rows
    assert ".tmp-" not in page  # no temporary names leak into titles
    assert f"from_pretrained(&#x27;{report_run / 'search' / 'fused'}&#x27;)" in page
    header = re.search(r"<h2 id='evaluation'>Evaluation</h2><table><thead><tr>(.*?)</tr>", page)
    cells = re.findall(r"<th>(.*?)</th>", header.group(1))
    assert cells[1] == "average"  # the answer's column first, the tasks after it
    training = re.search(r"<h2 id='training'>Training</h2><table><thead><tr>(.*?)</tr>", page)
    assert "validation loss" in re.findall(r"<th>(.*?)</th>", training.group(1))
    assert "training and validation loss of chat" in page  # the curves, measured in training


def test_report_says_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.resolved.yaml").write_text("run_dir: empty\n")  # a fresh run
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 0
    page = (tmp_path / "empty" / "report.html").read_text()
    assert "not curated yet" in page and "no search yet" in page and "not evaluated yet" in page


def test_report_refuses_a_folder_that_is_no_run_dir(tmp_path):
    """`fashionfuse report ANY_FOLDER` writes nothing there: one line, exit 2."""
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a fashionfuse run dir" in result.output
    assert not (tmp_path / "report.html").exists()


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium here (.ci/run installs it)")
def test_report_opens_in_a_headless_browser(report_run, tmp_path):
    url = (report_run / "report.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_browser(), *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f">{section}</h2>" in dom.stdout
    assert dom.stdout.count("<img") >= 4 and "<table" in dom.stdout
    console = [x for x in dom.stderr.splitlines() if "CONSOLE" in x or "Uncaught" in x]
    assert not console, console
    # the docs' screenshot (docs/report.png) is taken by the same function
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from report_screenshot import screenshot

    shot = screenshot(report_run / "report.html", tmp_path / "report.png")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


# measures the laid-out page once it has loaded and writes the figures into the DOM, where
# --dump-dom returns them
_LAYOUT_PROBE = """<script>
window.addEventListener('load', () => {
  const body = document.body.getBoundingClientRect(), style = getComputedStyle(document.body);
  const content = body.width - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const imgs = [...document.images].map(i => ({w: i.getBoundingClientRect().width,
                                               natural: i.naturalWidth}));
  const tables = [...document.querySelectorAll('table')].map(t => ({
    w: t.getBoundingClientRect().width, scroll: t.scrollWidth}));
  const out = {viewport: window.innerWidth, page: document.documentElement.scrollWidth,
               left: body.left + parseFloat(style.paddingLeft), content, imgs, tables};
  const pre = document.createElement('pre');
  pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium here (.ci/run installs it)")
@pytest.mark.parametrize("width", [1400, 520])  # Chromium windows are 500 wide at least
def test_report_layout_keeps_margins_and_fits_the_window(report_run, tmp_path, width):
    """Laid out by Chromium at a desktop and a phone width: the text column is at most 62rem
    with side margins, nothing widens the page (wide tables scroll in their own box), and every
    chart is decoded and scaled to the column, at least half its width."""
    import json

    page = (report_run / "report.html").read_text().replace("</body>", _LAYOUT_PROBE + "</body>")
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
             f"--window-size={width},900", "--virtual-time-budget=10000"]
    dom = subprocess.run([_browser(), *flags, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120)
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    layout = json.loads(found.group(1).replace("&quot;", '"'))
    assert layout["viewport"] == width
    assert layout["page"] <= width  # no horizontal scroll of the page itself
    assert 16 <= layout["left"]  # a margin on the left at every width
    assert layout["content"] <= 62 * 16 + 1  # 62rem text column on a wide screen
    assert width - layout["left"] - layout["content"] >= 16  # and on the right
    charts = [i for i in layout["imgs"] if i["natural"]]
    assert len(charts) == len(layout["imgs"]) >= 4  # every image decoded
    for img in charts:
        assert layout["content"] / 2 <= img["w"] <= layout["content"] + 0.5
    for table in layout["tables"]:
        assert table["w"] <= layout["content"] + 0.5  # a wide table scrolls inside its box


def test_tensorboard_event_files_load_with_tensorboards_reader(pipeline_run):
    import numpy
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pipeline_run["run_dir"]
    train = EventAccumulator(str(run / "tensorboard" / "train" / "chat"))
    train.Reload()
    loss = train.Scalars("train/loss")
    history = [__import__("json").loads(x) for x in
               (run / "adapters" / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in loss] == [h["step"] for h in history]
    # TensorBoard stores float32: compare the logged loss as float32, not rounded decimals
    # (3.94625 rounds to 3.9462 as float32 and to 3.9463 as float64)
    assert [e.value for e in loss] == [float(numpy.float32(h["loss"])) for h in history]
    assert {"train/lr", "train/tokens_per_s", "train/padding_pct"} <= set(train.Tags()["scalars"])
    search = EventAccumulator(str(run / "tensorboard" / "search" / "grid"))
    search.Reload()
    assert len(search.Scalars("search/score")) == 4 and "search/w_chat" in search.Tags()["scalars"]


def test_a_tracker_that_is_not_installed_is_one_line(make_config, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    path = make_config(report_to=["tensorboard", "wandb"],
                       training={"batch_size": 8, "micro_batch_size": 4, "max_steps": 1,
                                 "lora": {"r": 4, "alpha": 8}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train-adapter", str(path)])
    assert result.exit_code == 2
    assert "error: report_to: wandb is not installed" in result.output
