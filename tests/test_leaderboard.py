"""The static leaderboard: grouping by hardware, escaping, atomic builds, and a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from markupsafe import escape

from capbench_core.analytics.metrics import pareto_front
from capbench_core.store import Store
from capbench_leaderboard import charts, site
from tests.conftest import CAPBENCH, default_sigint, missing, run_cli
from tests.seed import HARDWARE, MODEL, result, seeded

HOSTILE = ['<script>alert("x")</script>', "\"'><img src=x onerror=alert(1)>", "x" * 300,
           "ü—漢字🙂 &amp; &lt;", "{{ 7*7 }}", "[bold red]markup[/]"]


def _seed(url: str) -> list:  # type: ignore[type-arg]
    store = Store(url)
    runs = seeded()
    for r in runs:
        store.save(r)
    return runs


def test_every_table_and_chart_holds_one_fingerprint(tmp_path: Path, db_url: str) -> None:
    runs = _seed(db_url)
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(tmp_path / "site"), check=True)
    pages = sorted((tmp_path / "site" / "hw").glob("*.html"))
    assert {p.stem for p in pages} == {hw.fingerprint for hw in HARDWARE.values()}
    for page in pages:
        text = page.read_text()
        ids = set(re.findall(r'data-run="([^"]+)"', text))
        assert ids and {r.hardware.fingerprint for r in runs if r.run_id in ids} == {page.stem}
        assert set(re.findall(r'data-fingerprint="([^"]+)"', text)) == {page.stem}
    index = (tmp_path / "site" / "index.html").read_text()
    assert index.count('<tr class="group">') == 3 and "cdn" not in index.lower() and "http" not in index
    for r in runs:
        raw = json.loads((tmp_path / "site" / "runs" / f"{r.run_id}.json").read_text())
        assert raw["run_id"] == r.run_id


def test_hostile_values_are_escaped_in_the_site_and_the_terminal(tmp_path: Path, db_url: str) -> None:
    store = Store(db_url)
    for i, bad in enumerate(HOSTILE):
        model = MODEL.model_copy(update={"name": bad, "architecture": bad})
        store.save(result("cpu", bad[:64], 1 + i, model=model, engine_version=bad[:128], task=bad[:128]))
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(tmp_path / "site"), check=True)
    pages = [p.read_text() for p in (tmp_path / "site").rglob("*.html")]
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    joined = "".join(pages)
    for bad in HOSTILE:
        assert str(escape(bad[:64])) in joined, bad
    shown = run_cli("compare", "--db", db_url, env={"COLUMNS": "400"}, check=True).stdout
    assert "[bold red]markup[/]" in shown and "漢字" in shown
    rows = list(run_cli("compare", "--db", db_url, "--csv", check=True).stdout.splitlines())
    assert len(rows) == 1 + len(HOSTILE)


def test_compare_filters_by_hardware_and_prints_csv(db_url: str) -> None:
    _seed(db_url)
    fp = HARDWARE["h100"].fingerprint
    rows = json.loads(run_cli("compare", "--db", db_url, "--hardware", fp[:6], "--json", check=True).stdout)
    assert len(rows) == 4 and {r["hardware_fingerprint"] for r in rows} == {fp}
    csv_text = run_cli("compare", "--db", db_url, "--hardware", fp, "--csv", check=True).stdout
    header, *lines = csv_text.splitlines()
    assert header.startswith("run_id,started_at,status,backend") and len(lines) == 4
    table = run_cli("compare", "--db", db_url, env={"COLUMNS": "300"}, check=True).stdout
    assert table.count("CAP — model tiny-moe") == 3


def test_pareto_front_and_radar_normalisation() -> None:
    assert pareto_front([(1, 10), (2, 20), (3, 15), (1, 5)]) == [True, True, False, False]
    assert charts.normalise([10, 20, None], True) == [20.0, 100.0, 0.0]
    assert charts.normalise([10, 20], False) == [100.0, 20.0]
    assert charts.normalise([5, 5], True) == [100.0, 100.0]
    scatter = charts.pareto(seeded()[:4])
    assert scatter is not None
    left, top, right, bottom = scatter.plot
    assert all(left <= p.x <= right and top <= p.y <= bottom for s in scatter.series for p in s.points)


def test_an_interrupted_build_leaves_the_previous_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "site"
    site.build(seeded()[:2], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    class Interrupted(BaseException):
        """Stands for Ctrl-C or SIGTERM halfway through (KeyboardInterrupt itself would stop pytest)."""

    def boom(*_: object) -> None:
        raise Interrupted

    monkeypatch.setattr(site, "_swap", boom)
    with pytest.raises(Interrupted):
        site.build(seeded(), out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no temp dir left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    from capbench_core.errors import CapbenchError

    with pytest.raises(CapbenchError, match="is not a capbench site"):
        site.build(seeded(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.fixture
def served_site(tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    runs = _seed(db_url)
    out = tmp_path / "site"
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(out), check=True)
    proc = subprocess.Popen([CAPBENCH, "leaderboard", "serve", "--dir", str(out), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert url, line
    try:
        yield url.group(0), runs
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("Debian's chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    assert path is not None
    return path


def test_the_site_in_headless_chromium(served_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    base, runs = served_site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "index.html")
        assert page.locator("tr.group").count() == 3
        h100 = HARDWARE["h100"].fingerprint
        page.click(f"a[href='hw/{h100}.html']")
        page.wait_for_load_state()
        rows = page.locator("table.cap tbody tr.run")
        assert rows.count() == 4
        assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.backend)")) == [
            "sglang", "sglang", "vllm", "vllm"]
        # the table fits a 1280 px window: no horizontal scroll, engine details on demand
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        assert page.locator("table.cap td.backend div.engine").first.is_hidden()
        page.locator("table.cap td.backend summary").first.click()
        assert page.locator("table.cap td.backend div.engine").first.is_visible()
        page.select_option("div.filters select[data-filter='backend']", "vllm")
        visible = "rs => rs.filter(r => !r.hidden).map(r => r.dataset.backend)"
        assert rows.evaluate_all(visible) == ["vllm", "vllm"]
        page.select_option("div.filters select[data-filter='backend']", "")
        assert len(rows.evaluate_all(visible)) == 4
        assert page.locator("svg.radar").count() == 2 and page.locator("svg.pareto circle.point").count() == 4
        ringed = page.locator("svg.pareto circle.pareto")
        # each backend's frontier: per user faster or per device more productive than its other load
        assert set(ringed.evaluate_all("cs => cs.map(c => c.parentElement.dataset.backend)")) == {"sglang", "vllm"}
        hover = page.locator("svg.pareto circle.point title").first.text_content()
        assert "tok/s per user" in hover and "tok/s per device" in hover and "Mtok" in hover
        throughput = page.locator("table.cap thead th", has_text="out tok/s")
        throughput.click()
        column = ("rs => { const i = [...rs[0].closest('table').tHead.rows[0].cells]"
                  ".findIndex(c => c.textContent.trim() === 'out tok/s'); "
                  "return rs.map(r => parseFloat(r.cells[i].dataset.v)); }")
        ascending = rows.evaluate_all(column)
        assert ascending == sorted(ascending)
        throughput.click()
        assert rows.evaluate_all(column) == sorted(ascending, reverse=True)
        heatmap = page.locator("svg.heatmap[data-backend='sglang']")
        assert heatmap.is_visible() and heatmap.locator("rect.cell").count() == 3 * 8
        assert heatmap.locator("rect.bar").count() == 3
        hottest = heatmap.locator("rect.cell title", has_text="layer 0, expert 0:")
        assert "40 tokens" in hottest.first.text_content()
        heatmap.screenshot(path=str(tmp_path / "routing.png"))
        shot = tmp_path / "group.png"
        page.locator("svg.pareto").screenshot(path=str(shot))
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert errors == []
    _assert_chart_is_drawn(shot)
    _assert_heatmap_is_drawn(tmp_path / "routing.png")


def _assert_heatmap_is_drawn(png: Path) -> None:
    """The routing heatmap shows shades of the palette's blue (cells) and red bars, not a blank box."""
    from PIL import Image

    colours = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20) or []
    blue = sum(count for count, (r, g, b) in colours if b > r + 40 and b > 150)
    red = sum(count for count, (r, g, b) in colours if r > 180 and g < 80 and b < 80)
    assert blue > 200 and red > 50, (blue, red)


def _assert_chart_is_drawn(png: Path) -> None:
    """The screenshot of the chart has coloured marks (the series colours), not a blank plot."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    series = {tuple(int(charts.PALETTE[i][k:k + 2], 16) for k in (1, 3, 5)) for i in range(2)}
    drawn = sum(count for count, rgb in colours if rgb in series)
    assert len(colours) > 20 and drawn > 100, (len(colours), drawn)


def test_serve_refuses_a_directory_without_a_site(tmp_path: Path) -> None:
    proc = run_cli("leaderboard", "serve", "--dir", str(tmp_path))
    assert proc.returncode == 1 and "has no index.html" in proc.stderr
