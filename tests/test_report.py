"""`batch` writes report.html: one self-contained page, one row per slide, failed slides first; checked with an
HTML parser and opened in headless Chromium with the network blocked."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import synthetic_tissue, write_pyramid
from wsi_histosge.cli.app import app
from wsi_histosge.errors import UsageError
from wsi_histosge.report import (
    PICTURE_BUDGET_MB,
    check_report_genes,
    default_report_genes,
    parse_report_genes,
    picture_sides,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"
#: Chromium comes from Debian (`apt-get install -y chromium`); PyPI's playwright would download its own build.
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def need_chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("headless Chromium missing in CI: install it with `apt-get install -y chromium`")
    pytest.skip("headless Chromium not installed (apt-get install -y chromium); the report is not opened")


class _Page(HTMLParser):
    """Every tag with its attributes, the table rows (class, texts, images) and the header cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[dict[str, Any]] = []
        self.header: list[str] = []
        self.style = ""
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "tr" and "tbody" in self._in:
            self.rows.append({"class": a.get("class", ""), "text": "", "images": [], "cells": []})
        if tag == "td" and self.rows and "tbody" in self._in:
            self.rows[-1]["cells"].append("")
        if tag == "img" and self.rows and "tbody" in self._in:
            self.rows[-1]["images"].append(a)
        if tag not in ("img", "meta", "br"):
            self._in.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            del self._in[len(self._in) - 1 - self._in[::-1].index(tag) :]

    def handle_data(self, data: str) -> None:
        if "style" in self._in:
            self.style += data
        elif "th" in self._in and "thead" in self._in:
            self.header.append(data.strip())
        elif self.rows and "tbody" in self._in:
            self.rows[-1]["text"] += data + "\n"
            if self.rows[-1]["cells"]:
                self.rows[-1]["cells"][-1] += data + "\n"


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _image(src: str) -> np.ndarray:
    from PIL import Image

    assert src.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def _assert_self_contained(page: _Page) -> None:
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base", "frame"), tag
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            if name in attrs:
                assert attrs[name].startswith("data:"), f"<{tag} {name}={attrs[name][:60]}>: not inline"
        assert not any(k.startswith("on") for k in attrs), f"<{tag}> has an event handler"
    assert "url(" not in page.style and "@import" not in page.style
    csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`wsi-histosge batch slides/ --out results/` with default flags (the built-in model) on the packaged
    sample slide, a truncated copy of it and a text file named like a slide."""
    root = tmp_path_factory.mktemp("report")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(SAMPLE, slides / "sample.tif")
    (slides / "truncated.tif").write_bytes(SAMPLE.read_bytes()[:30_000])
    (slides / "notes.svs").write_text("not a slide\n")
    out = root / "results"
    res = CliRunner().invoke(app, ["batch", str(slides), "--out", str(out)])
    assert res.exit_code == 10, res.output  # some slides failed
    assert f"report: {out / 'report.html'}" in " ".join(res.output.split())
    return out


def test_report_rows_failed_first_and_self_contained(cohort: Path) -> None:
    page = _parse(cohort / "report.html")
    _assert_self_contained(page)
    summary = {r["id"]: r for r in csv.DictReader((cohort / "summary.csv").open())}
    assert len(page.rows) == len(summary) == 3  # one row per slide
    # failed first, in the run's order (notes, truncated), then the done slide
    assert [r["class"] for r in page.rows] == ["failed", "failed", "done"]
    ids = [r["cells"][1].strip().split()[0] for r in page.rows]
    assert ids == ["notes", "truncated", "sample"]
    for row in page.rows[:2]:
        slide = Path(summary[row["cells"][1].split()[0]]["slide"]).name
        assert slide in row["cells"][2] and "(exit 4)" in row["cells"][2]  # status and reason
    # default genes of the built-in model, one small map each, on one shared colour scale
    assert page.header[-3:] == ["ERBB2", "EPCAM", "COL1A1"]
    done = page.rows[2]
    assert done["cells"][4].strip() == summary["sample"]["spots"] == "154"
    assert float(done["cells"][6]) == pytest.approx(float(summary["sample"]["seconds"]), abs=0.06)
    # how far to trust it: the breast model finds the skin sample unlike its training tissue (154 of 154)
    assert page.header[7] == "trust (cells)"
    share = float(summary["sample"]["unlike_training_share"])
    assert f"unlike training {share * 100:.1f}%" in done["cells"][7] and share > 0.9
    assert f"pen ink {summary['sample']['pen_ink_cells']}" in done["cells"][7]
    assert page.rows[0]["cells"][7].strip() == "-"  # a failed slide has no trust figures
    thumb, *maps = [_image(img["src"]) for img in done["images"]]
    assert len(maps) == 3 and max(thumb.shape[:2]) <= 256 and all(max(m.shape[:2]) <= 192 for m in maps)
    outline = (np.abs(thumb.astype(int) - (20, 200, 60)).sum(axis=2) < 90).sum()
    assert outline > 200, "no tissue outline drawn on the thumbnail"
    assert all(m.std() > 20 for m in maps), "a gene map without contrast"
    assert not np.array_equal(maps[0], maps[1]) and not np.array_equal(maps[1], maps[2])
    legend = [a for t, a in page.tags if t == "img" and a.get("alt", "").startswith("colour scale of")]
    assert len(legend) == 3
    assert (cohort / "report.html").stat().st_size < 400_000


def _colourful(png: Path) -> float:
    from PIL import Image

    hsv = np.asarray(Image.open(png).convert("RGB").convert("HSV")).astype(int)
    return float(((hsv[..., 1] > 90) & (hsv[..., 2] > 50)).mean())


def _screenshot(chromium: str, page: Path, png: Path) -> None:
    """Headless Chromium with every host unresolvable and a proxy to nowhere: nothing can be fetched."""
    profile = png.parent / f"{png.stem}-profile"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        "--window-size=1400,1000",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(profile)})
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]


def test_report_opens_in_headless_chromium_offline(cohort: Path, tmp_path: Path) -> None:
    chromium = need_chromium()
    shot = tmp_path / "report.png"
    _screenshot(chromium, cohort / "report.html", shot)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (1000, 1400) and (img < 250).mean() > 0.2, "the screenshot is (nearly) blank"
    shown = _colourful(shot)
    # control: the same page with its pictures pointing at the network instead of inline data shows none of
    # them (the network is blocked), so the colour above comes from the inline pictures
    broken = tmp_path / "broken.html"
    text = (cohort / "report.html").read_text(encoding="utf-8")
    broken.write_text(text.replace('src="data:image/jpeg', 'src="http://example.org/x.jpg#'), encoding="utf-8")
    _screenshot(chromium, broken, tmp_path / "broken.png")
    assert shown > 0.05 > _colourful(tmp_path / "broken.png"), (shown, _colourful(tmp_path / "broken.png"))


def test_order_and_size_budget_for_a_large_cohort(tmp_path: Path) -> None:
    statuses = ["done", "failed", "locked", "interrupted", "failed", "done"] * 50
    rows = [
        {
            "id": f"s{i}",
            "slide": str(tmp_path / f"s{i}.svs"),
            "status": s,
            "error": f"reason {i}" if s != "done" else "",
        }
        for i, s in enumerate(statuses)
    ]
    out = write_report(tmp_path, rows, genes=["G1"], isolate=False)
    page = _parse(out)
    _assert_self_contained(page)
    classes = [r["class"] for r in page.rows]
    assert classes == sorted(classes, key=["failed", "interrupted", "locked", "done"].index)
    failed_ids = [r["cells"][1].split()[0] for r in page.rows if r["class"] == "failed"]
    assert failed_ids == [f"s{i}" for i, s in enumerate(statuses) if s == "failed"]  # run order kept
    # picture sizes shrink with the cohort so that all pictures stay about the budget
    sides = [picture_sides(n, 3)[0] for n in (10, 1000, 5000, 100_000)]
    assert sides == sorted(sides, reverse=True) and sides[0] == 256 and sides[-1] == 64
    for n in (1000, 5000):
        side, map_side = picture_sides(n, 3)
        assert n * (side**2 + 3 * map_side**2) * 0.45 < 1.1 * PICTURE_BUDGET_MB * 2**20


def test_report_genes_option(tmp_path: Path, tiny_model: Path) -> None:
    builtin = json.loads((ROOT / "wsi_histosge" / "models" / "her2st-effnetlite0" / "model.json").read_text())
    assert default_report_genes(builtin["genes"]) == ["ERBB2", "EPCAM", "COL1A1"]
    assert default_report_genes([f"G{i}" for i in range(12)]) == ["G0", "G1", "G2"]
    assert parse_report_genes(" FN1, CD74 ,FN1,") == ["FN1", "CD74"] and parse_report_genes("") == []
    with pytest.raises(UsageError, match="at most"):
        parse_report_genes(",".join(f"G{i}" for i in range(9)))
    check_report_genes(["G3"], tiny_model)
    res = CliRunner().invoke(app, ["batch", str(SAMPLE), "--out", str(tmp_path / "o"), "--report-genes", "ERBB3"])
    assert res.exit_code == 2 and "'ERBB3'" in res.output and "ERBB2" in res.output, res.output
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_a_reader_that_crashes_fails_one_row_of_the_report(tmp_path: Path, tiny_model: Path) -> None:
    good = write_pyramid(tmp_path / "good.tif", synthetic_tissue(800, 800), levels=1)
    bad = tmp_path / "bad.segv"
    bad.write_bytes(b"crash me")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "WSI_HISTOSGE_READER_PLUGINS": "tests.plugins.crashing_reader:opener",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    args = ["batch", str(good), str(bad), "--out", str(out), "--model", str(tiny_model), "--stride-um", "40"]
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_histosge.cli.app", *args, "--report-genes", "G1,G2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 10, proc.stdout + proc.stderr
    page = _parse(out / "report.html")
    assert [r["class"] for r in page.rows] == ["failed", "done"]
    assert "crashed the report's reader process (signal 11)" in " ".join(page.rows[0]["text"].split())
    assert len(page.rows[1]["images"]) == 3  # the next slide still got its thumbnail and both maps
    assert page.header[-2:] == ["G1", "G2"]
