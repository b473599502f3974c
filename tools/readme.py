"""Render README.md from nbs/index.ipynb without quarto (which `nbdev-readme` needs and this offline machine lacks).

Markdown cells are copied, code cells become ```python blocks with their stored text outputs, and cells marked
`#| hide` are dropped — the same choices nbdev-readme makes. `make readme` uses nbdev-readme when quarto is on PATH."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file -->\n\n"


def directives(src: str) -> set[str]:
    "The `#| ...` directive words of a code cell."
    return {w for line in src.splitlines() if line.startswith("#|") for w in line[2:].split()}


def render_cell(cell: dict) -> str:
    "One cell as Markdown, or '' when it is hidden."
    src = "".join(cell["source"])
    if cell["cell_type"] == "markdown": return src
    if "hide" in directives(src): return ""
    code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
    outs = []
    for o in cell.get("outputs", []):
        text = o.get("text") or o.get("data", {}).get("text/markdown") or o.get("data", {}).get("text/plain")
        if text: outs.append("".join(text).rstrip())
    return f"```python\n{code}\n```" + "".join(f"\n\n```\n{t}\n```" for t in outs)


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "README text for the notebook at `nb_path`."
    cells = json.loads(nb_path.read_text())["cells"]
    return HEADER + "\n\n".join(t for t in map(render_cell, cells) if t.strip()) + "\n"


if __name__ == "__main__":
    out = ROOT / "README.md"
    out.write_text(render())
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)
