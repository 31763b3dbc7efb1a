"""MkDocs hooks: pages include what the main job and the benchmarks *generate*, never typed numbers.

A page marks the place with an HTML comment, ``<!-- generated: NAME -->``:

- ``variants-summary``: ``runs/variants/summary.md``, the table ``python -m experiments.variants``
  writes (with its loss curves and the device and config from ``summary.json``);
- ``benchmarks``: ``benchmarks/README.md`` (the measured benchmark results and how they were taken),
  with the plot ``python -m benchmarks.suite`` writes to ``runs/benchmarks/suite.png``.

When a file is absent (a fresh clone) the page says which command produces it. The runs directory is
``runs/`` next to ``mkdocs.yml``, or ``$RECURRENT_DOCS_RUNS``.
"""

from __future__ import annotations

import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "<!-- generated: {} -->"
#: Generated images the pages may show: site path -> path under the runs directory.
IMAGES = {
    "generated/variants_loss_curves.png": "variants/curves.png",
    "generated/benchmarks_suite.png": "benchmarks/suite.png",
}


def runs_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RECURRENT_DOCS_RUNS", ROOT / "runs"))


def _image(site_path: str, alt: str, runs: pathlib.Path) -> str:
    return f"![{alt}]({site_path})\n" if (runs / IMAGES[site_path]).is_file() else ""


def variants_summary(runs: pathlib.Path) -> str:
    """The Markdown of the measured variants table, or how to produce it."""
    table = runs / "variants" / "summary.md"
    if not table.is_file():
        return (
            '!!! note "Not measured in this build"\n'
            "    This page shows the table the main job writes, `runs/variants/summary.md`. Produce it with\n"
            "    `python -m experiments.variants` (or `--quick` for a shrunken run) and rebuild the docs.\n"
        )
    parts = []
    meta = runs / "variants" / "summary.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        config = info.get("config", {})
        keys = ("steps", "batch_size", "seq_len", "hidden", "learning_rate", "seed")
        settings = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
        parts.append(f"Measured on `{info.get('device', '?')}` with {settings}.\n")
    parts.append(table.read_text().strip() + "\n")
    parts.append(_image("generated/variants_loss_curves.png", "loss curves of every variant", runs))
    return "\n".join(p for p in parts if p)


def benchmarks(runs: pathlib.Path) -> str:
    """``benchmarks/README.md`` one heading level down, and the suite's plot when it exists."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out, fenced = [], False
    for line in lines:
        fenced ^= line.startswith("```")
        out.append("#" + line if not fenced and line.startswith("#") else line)
    plot = _image("generated/benchmarks_suite.png", "benchmark suite", runs)
    if plot:
        plot = "## The suite's plot (from `runs/benchmarks/suite.png`)\n\n" + plot
    else:
        plot = (
            '!!! note "No suite plot in this build"\n'
            "    `python -m benchmarks.suite --out runs/benchmarks` writes `suite.png`; rebuild the docs to show it.\n"
        )
    return "\n".join(out) + "\n\n" + plot


GENERATORS = {"variants-summary": variants_summary, "benchmarks": benchmarks}


def on_page_markdown(markdown, page, config, files):
    for name, generate in GENERATORS.items():
        marker = MARKER.format(name)
        if marker in markdown:
            markdown = markdown.replace(marker, generate(runs_dir()))
    return markdown


def on_files(files, config):
    from mkdocs.structure.files import File

    runs = runs_dir()
    for site_path, rel in IMAGES.items():
        if (runs / rel).is_file():
            files.append(File.generated(config, site_path, abs_src_path=str(runs / rel)))
    return files
