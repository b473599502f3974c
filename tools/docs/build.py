"""Build the docs site offline: executed notebooks → nbdev's own processors → Markdown pages → mkdocs-material.

quarto (what `nbdev-docs` renders with) is not installable here, so `make docs` does what it does in three steps:
1. every course notebook (`nbs/index.ipynb`, then `nbs/00_…` … in file order, lettered companions included) is
   taken from its executed copy in `_runs/` (written by the papermill chain); a missing or stale copy is executed
   with papermill (SMOKE=True) first;
2. nbdev's `FilterDefaults` processors run on it as in `nbdev-proc-nbs` (`#| hide`, `show_doc` cells for exported
   definitions, `#| exports` source folds, doc links), with three course choices: exported cells show their source
   (a learner reads the code, so `#| export` is treated as nbdev's `#| exports`), typer parameters render as their
   default and help text instead of `<typer.models.OptionInfo object at …>`, and only the cells `show_doc` needs are
   re-run (nbdev also re-runs cells mixing imports with other code, which fails and would replace executed outputs);
3. each processed notebook becomes a Markdown page that interprets the quarto cell options nbdev leaves behind
   (`echo`, `output`, `include`, `code-fold`), and mkdocs-material builds `_docs/` with a sidebar in course order,
   previous/next links, search and mermaid diagrams from a vendored mermaid (no CDN).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NBS, RUNS = ROOT / "nbs", ROOT / "_runs"
STAGE = ROOT / "_proc" / "mkdocs"  # Markdown pages mkdocs reads (git-ignored, rebuilt every time)
SITE = ROOT / "_docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
MERMAID_VERSION = "11.17.2"  # the major version mkdocs-material 9 loads from its CDN; vendored here instead
MERMAID_INTEGRITY = "sha512-V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7LoaRQxULMa80/qt5gHO73aCleBBg=="
MERMAID_CACHE = ROOT / "tools" / "docs" / "node_modules"  # git-ignored; `npm pack` tarball lives here
PROCESS_ERRORS: list[str] = []  # notebooks whose page shows a processing error instead of the notebook
ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")
TYPER_REPR = re.compile(r"<typer\.models\.(Option|Argument)Info object at 0x[0-9a-f]+>")  # a CLI default in a repr
DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def log(msg: str): print(f"docs: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- course notebooks
def course_notebooks(nbs: Path = NBS) -> list[Path]:
    "The home page, then every numbered notebook (`00_core`, …, `03a_…`) in file name order: the course order."
    numbered = sorted(p for p in nbs.glob("[0-9][0-9]*.ipynb"))
    return ([nbs / "index.ipynb"] if (nbs / "index.ipynb").exists() else []) + numbered


def page_name(nb: Path) -> str:
    "The page file nbdev/quarto gives notebook `nb` (`00_core.ipynb` → `core`), so links match the published site."
    from nbdev.config import nbpath2html
    return nbpath2html(nb).stem


def clean_title(text: str) -> str:
    "A heading's text without leading `#` marks, however many (`# # Core: x` → `Core: x`)."
    return re.sub(r"^(?:#+\s*)+", "", text.strip()).strip()


def nav_title(nb: Path, title: str) -> str:
    "Short sidebar label: the notebook number and the title up to its colon (`00 Core`)."
    m = re.match(r"^(\d+[a-z]?)_", nb.name)
    short = title.split(":")[0].strip()
    return f"{m.group(1)} {short}" if m else short


def executed_copy(nb: Path, runs: Path = RUNS, execute: str = "stale") -> Path:
    """The executed copy of `nb` in `runs`, executing it with papermill (SMOKE=True) when needed.

    `execute`: "stale" re-executes when the copy is missing or older than the source (what `make docs` does),
    "missing" only when it is missing, "never" falls back to the unexecuted source."""
    if not nb.name[0].isdigit(): return nb  # the home page has no outputs to compute
    out = runs / nb.name
    fresh = out.exists() and out.stat().st_mtime >= nb.stat().st_mtime and not run_failed(out)
    if fresh or (out.exists() and execute in ("missing", "never")): return out
    if execute == "never":
        log(f"{nb.name}: no executed copy in {runs}, rendering the source without outputs")
        return nb
    import papermill as pm
    log(f"{nb.name}: executing with papermill (SMOKE=True) into {runs}/")
    runs.mkdir(parents=True, exist_ok=True)
    try: pm.execute_notebook(str(nb), str(out), parameters={"SMOKE": True}, cwd=str(nb.parent), kernel_name="python3",
                             progress_bar=False, request_save_on_cell_execute=False)
    except pm.PapermillExecutionError as e:  # the page still shows every cell up to the failure, and says so
        log(f"{nb.name}: FAILED at cell {e.exec_count}: {e.ename}: {e.evalue}")
    return out


def run_failed(executed: Path) -> bool:
    "Did the papermill run that wrote `executed` stop at an error?"
    return bool(json.loads(executed.read_text()).get("metadata", {}).get("papermill", {}).get("exception"))


# ------------------------------------------------------------------------------------------ nbdev's processing
def patch_typer_signatures():
    """Make fastcore's docments (which `show_doc` uses) render a typer parameter as its default plus its help text,
    and a pydantic model (`Settings`) as its fields (the environment variables) instead of BaseSettings' internals."""
    import fastcore.docments as dm
    import typer.models
    if getattr(dm._get_full, "typer_aware", False): return
    plain = dm._get_full

    def _get_full(p, docs, eval_str=False):
        res = plain(p, docs, eval_str=eval_str)
        info = res.default
        if isinstance(info, typer.models.ParameterInfo):
            res.default = dm.empty if info.default is ... else info.default  # `...` marks a required argument
            if res.anno is type(info): res.anno = dm.empty if res.default is dm.empty else type(res.default)
            res.docment = res.docment or info.help
        return res
    _get_full.typer_aware = True
    dm._get_full = _get_full

    plain_docments = dm.docments

    def docments(s, full=False, **kw):  # a pydantic model's parameters are its fields, not BaseSettings.__init__'s
        if not (inspect.isclass(s) and _is_pydantic_model(s)): return plain_docments(s, full=full, **kw)
        comments = _field_comments(s)
        res = {(f.alias or n): dm.AttrDict(docment=f.description or comments.get(n), anno=f.annotation,
                                           default=dm.empty if f.is_required() else f.default, kind=dm.Parameter.KEYWORD_ONLY)
               for n, f in s.model_fields.items()}
        if kw.get("returns", True): res["return"] = dm.AttrDict(docment=None, anno=dm.empty, default=dm.empty)
        return dm.AttrDict(res if full else {k: v.docment for k, v in res.items()})
    dm.docments = docments


def _is_pydantic_model(cls) -> bool:
    try: from pydantic import BaseModel
    except ImportError: return False
    return issubclass(cls, BaseModel)


def _field_comments(cls) -> dict[str, str]:
    "The `# comment` closing each `name: type = ...` line of a class's source, when the source can be found."
    try: src = inspect.getsource(cls)
    except (OSError, TypeError): return {}
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M)}


def show_exported_source(nb):
    "Treat `#| export`/`#| exporti` cells as nbdev's `#| exports`: signature and docstring, then the source."
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        cell.source = re.sub(r"^(#\|\s*)(?:export|exporti)(\s|$)", r"\1exports\2", cell.source, flags=re.M)


def rerun_for_docs(cell) -> bool:
    """Is `cell` one nbdev must re-run so the `show_doc` cells can render: exported, pure import or `show_doc` cells.

    nbdev's `exec_show_docs` also re-runs cells that mix imports with other code (it warns "See FAQ"); those need
    variables of earlier cells it does not run, and their executed outputs are the ones worth showing, so not here."""
    from nbdev.processors import _show_docs, cell_lang
    if cell.cell_type != "code" or not cell.source or cell_lang(cell) != "python": return False
    if cell.directives_.get("eval", "").lower() == "false": return False
    if cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}: return True
    trees = cell.parsed_()
    return bool(trees) and (all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in trees) or bool(_show_docs(trees)))


def docs_filter():
    "nbdev's `FilterDefaults` processors with `exec_show_docs` re-running only what `show_doc` needs."
    from nbdev.processors import FilterDefaults, exec_show_docs

    class exec_show_docs_only(exec_show_docs):
        def __call__(self, cell):
            if not self.nb.has_docs_ or not hasattr(self, "k") or not rerun_for_docs(cell): return
            self.k.cell(cell)
            if e := self.k.exc: raise RuntimeError(f"{self.nb.path_}: cell {cell.idx_} failed:\n{cell.source}\n{type(e).__name__}: {e}") from e

    class DocsFilter(FilterDefaults):
        def base_procs(self): return [exec_show_docs_only if p is exec_show_docs else p for p in super().base_procs()]
    return DocsFilter()


def process(src: Path, name: str):
    "The notebook at `src` (named `name`, as in nbs/) after nbdev's docs processors, with its outputs."
    from fastcore.nbio import read_nb
    patch_typer_signatures()
    nb = read_nb(src)
    nb.path_ = str(NBS / name)
    for cell in nb.cells:  # nbdev re-runs import cells for show_doc; some read the papermill parameters (SMOKE)
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags: cell.source = "#| exec_doc\n" + cell.source
        if "injected-parameters" in tags: cell.source = "#| exec_doc\n#| hide\n" + cell.source
    show_exported_source(nb)
    prev = os.environ.get("IN_TEST")
    os.environ["IN_TEST"] = "1"  # as nbdev-proc-nbs: cells it re-runs for show_doc use test sizes
    try: docs_filter()(nb)
    finally:
        if prev is None: os.environ.pop("IN_TEST", None)
        else: os.environ["IN_TEST"] = prev
    return nb


# -------------------------------------------------------------------------------------------- Markdown pages
def split_directives(source: str) -> tuple[dict, str]:
    "The `#| key: value` options opening a code cell, and the code without them."
    opts, lines = {}, source.splitlines()
    while lines and (m := DIRECTIVE.match(lines[0])):
        opts[m.group(1)] = m.group(2).strip().strip('"')
        lines.pop(0)
    return opts, "\n".join(lines).strip("\n")


def fence(text: str, lang: str = "") -> str:
    "`text` in a code fence longer than any backtick run inside it."
    ticks = "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _text(v) -> str: return "".join(v) if isinstance(v, list) else str(v)


def render_output(out: dict, assets: Path, stem: str, key: str) -> str:
    "One cell output as Markdown (images are written to `assets` and linked)."
    kind = out.get("output_type")
    if kind == "stream":
        return f'<div class="nb-output nb-{out.get("name", "stdout")}" markdown>\n\n' + fence(ANSI.sub("", _text(out["text"])), "text") + "\n\n</div>"
    if kind == "error":
        return '<div class="nb-output nb-error" markdown>\n\n' + fence(ANSI.sub("", "\n".join(out.get("traceback", []))), "text") + "\n\n</div>"
    data = out.get("data", {})
    for mime, ext in (("image/png", "png"), ("image/jpeg", "jpg")):
        if mime in data:
            assets.mkdir(parents=True, exist_ok=True)
            img = assets / f"{key}.{ext}"
            img.write_bytes(base64.b64decode(_text(data[mime])))
            alt = ANSI.sub("", _text(data.get("text/plain", "plot"))).replace('"', "'").strip()
            return f'<figure class="nb-output nb-plot"><img src="{stem}_files/{img.name}" alt="{alt}"></figure>'
    if "image/svg+xml" in data:
        return f'<figure class="nb-output nb-plot">\n{_text(data["image/svg+xml"])}\n</figure>'
    if "text/html" in data:
        return f'<div class="nb-output nb-html">\n{_text(data["text/html"]).strip()}\n</div>'
    if "text/markdown" in data:
        return _text(data["text/markdown"]).strip()
    if "text/plain" in data:
        text = TYPER_REPR.sub(r"typer.\1(…)", ANSI.sub("", _text(data["text/plain"])))
        return '<div class="nb-output nb-text" markdown>\n\n' + fence(text, "text") + "\n\n</div>"
    return ""


def is_definition_repr(out: dict) -> bool:
    "Is `out` only the repr of a function or class (`<function f(...)>`), which `show_doc` already renders?"
    data = out.get("data", {})
    return out.get("output_type") == "execute_result" and set(data) == {"text/plain"} and \
        bool(re.match(r"<(function|class|bound method) ", _text(data["text/plain"])))


def render_code(cell, assets: Path, stem: str) -> str:
    "A code cell: its source (unless `echo: false`), folded when nbdev marked it `code-fold`, then its outputs."
    opts, code = split_directives(cell.source)
    if opts.get("include") == "false": return ""
    parts = []
    if code and opts.get("echo") != "false":
        block = fence(code, "python")
        if "code-fold" in opts:
            summary = opts.get("code-summary") or "Source"
            block = f'???{"+" if opts["code-fold"] == "show" else ""} source "{summary}"\n\n' + "\n".join(
                f"    {l}" if l else "" for l in block.splitlines())
        parts.append(block)
    if opts.get("output") != "false":
        outs = cell.get("outputs", [])
        if "code-fold" in opts: outs = [o for o in outs if not is_definition_repr(o)]  # an exported cell's last line
        parts += [render_output(o, assets, stem, f"cell{cell.idx_}-{j}") for j, o in enumerate(outs)]
    return "\n\n".join(p for p in parts if p)


def first_h1(cells) -> str | None:
    "The text of the first level-1 heading in the markdown cells, if any."
    for c in cells:
        if c.cell_type == "markdown" and (m := re.search(r"^#\s+(\S.*?)\s*$", c.source, flags=re.M)): return m.group(1)
    return None


def relative_site_links(md: str, site_url: str) -> str:
    "Links to the published site (`{site_url}/core.html#x`) turned into links to this site's pages (`core.md#x`)."
    if not site_url: return md
    return re.sub(re.escape(site_url.rstrip("/")) + r"/([\w.-]+)\.html", r"\1.md", md)


def render_page(nb, stem: str, stage: Path, fallback_title: str, site_url: str = "") -> tuple[str, str]:
    "(title, Markdown) for a processed notebook; images go to `stage/{stem}_files/`."
    fm = dict(getattr(nb, "frontmatter_", {}) or {})
    cells = [c for c in nb.cells if not (c.cell_type == "raw" and c.source.lstrip().startswith("---"))]
    title = clean_title(str(fm.get("title") or first_h1(cells) or fallback_title))
    body = [f"# {title}"]
    if fm.get("description"): body.append(f'{fm["description"]}\n{{: .nb-description }}')
    assets = stage / f"{stem}_files"
    for i, c in enumerate(cells):
        src = c.get("source") or ""
        if c.cell_type == "markdown":
            if "title" not in fm and i == 0 and clean_title(src.splitlines()[0] if src else "") == title:
                src = "\n".join(src.splitlines()[1:])  # the title cell nbdev did not lift into frontmatter
            body.append(src)
        elif c.cell_type == "code": body.append(render_code(c, assets, stem))
    md = "\n\n".join(b for b in body if b and b.strip()) + "\n"
    return title, relative_site_links(md, site_url)


# -------------------------------------------------------------------------------------------- mermaid, offline
def vendored_mermaid(cache: Path = MERMAID_CACHE) -> Path:
    "mermaid.min.js from the npm registry (`npm pack`, integrity checked), cached under tools/docs/node_modules."
    js = cache / f"mermaid-{MERMAID_VERSION}.min.js"
    if js.exists(): return js
    cache.mkdir(parents=True, exist_ok=True)
    log(f"fetching mermaid@{MERMAID_VERSION} from the npm registry (once)")
    res = subprocess.run(["npm", "pack", f"mermaid@{MERMAID_VERSION}", "--json", "--pack-destination", str(cache)],
                         capture_output=True, text=True, check=True, timeout=600)
    info = json.loads(res.stdout)[0]
    tgz = cache / info["filename"]
    if info["integrity"] != MERMAID_INTEGRITY:
        tgz.unlink(missing_ok=True)
        raise RuntimeError(f"mermaid@{MERMAID_VERSION} integrity {info['integrity']} != pinned {MERMAID_INTEGRITY}")
    with tarfile.open(tgz) as tar: js.write_bytes(tar.extractfile("package/dist/mermaid.min.js").read())
    tgz.unlink()
    return js


# ------------------------------------------------------------------------------------------------------ build
def site_url() -> str:
    "The published site's address from nbs/nbdev.yml (links to it become local links)."
    cfg = yaml.safe_load((NBS / "nbdev.yml").read_text()) if (NBS / "nbdev.yml").exists() else {}
    return (cfg.get("website") or {}).get("site-url", "")


def stage_pages(stage: Path, runs: Path = RUNS, execute: str = "stale", notebooks: list[Path] | None = None) -> list:
    "Write one Markdown page per course notebook into `stage`; return the mkdocs nav in course order."
    if stage.exists(): shutil.rmtree(stage)
    (stage / "assets").mkdir(parents=True)
    shutil.copy(vendored_mermaid(), stage / "assets" / "mermaid.min.js")
    shutil.copy(Path(__file__).with_name("extra.css"), stage / "assets" / "extra.css")
    nav, url = [], site_url()
    for nb in notebooks or course_notebooks():
        t0 = time.perf_counter()
        src = executed_copy(nb, runs, execute)
        stem = page_name(nb)
        try: title, md = render_page(process(src, nb.name), stem, stage, nb.stem, url)
        except Exception as e:  # one broken notebook must not hide the rest of the course; main() exits 1 for it
            log(f"{nb.name}: FAILED to process: {type(e).__name__}: {e}")
            PROCESS_ERRORS.append(nb.name)
            title, md = nb.stem, f"# {nb.stem}\n\n!!! failure \"nbdev's processors failed on this notebook\"\n\n" + \
                "\n".join("    " + l for l in fence(f"{type(e).__name__}: {e}", "text").splitlines()) + "\n"
        (stage / f"{stem}.md").write_text(f"---\ntitle: {json.dumps(title)}\n---\n\n{md}")
        nav.append({("Home" if stem == "index" else nav_title(nb, title)): f"{stem}.md"})
        how = "from " + str(src.relative_to(runs) if src.is_relative_to(runs) else src.name) if src != nb else "source, no outputs"
        log(f"{nb.name} → {stem}.html ({how}, {time.perf_counter() - t0:.1f}s)")
    return nav


def build(site: Path = SITE, stage: Path = STAGE, runs: Path = RUNS, execute: str = "stale",
          notebooks: list[Path] | None = None) -> Path:
    "Build the whole site into `site`; return its index.html."
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    nav = stage_pages(stage, runs, execute, notebooks)
    cfg = load_config(str(MKDOCS_YML), docs_dir=str(stage), site_dir=str(site), nav=nav)
    mkdocs_build(cfg)
    return site / "index.html"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=SITE, help="output folder (default _docs/)")
    ap.add_argument("--stage", type=Path, default=STAGE, help="folder for the Markdown pages mkdocs reads (default: the git-ignored staging folder)")
    ap.add_argument("--execute", choices=["stale", "missing", "never"], default="stale",
                    help="run notebooks whose executed copy in _runs/ is stale or missing (default), only missing, or never")
    ap.add_argument("notebooks", nargs="*", type=Path, help="only these notebooks (default: the whole course)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    index = build(a.site.resolve(), a.stage.resolve(), execute=a.execute, notebooks=[p.resolve() for p in a.notebooks] or None)
    log(f"site built in {time.perf_counter() - t0:.0f}s: {index.relative_to(ROOT) if index.is_relative_to(ROOT) else index}")
    built = [p.resolve() for p in a.notebooks] or course_notebooks()
    failed = [nb.name for nb in built if (RUNS / nb.name).exists() and run_failed(RUNS / nb.name)]
    if failed and a.execute != "never": log(f"notebooks that stopped at an error (their pages show where): {', '.join(failed)}")
    if PROCESS_ERRORS: log(f"notebooks nbdev's processors failed on (their pages show the error): {', '.join(PROCESS_ERRORS)}")
    if PROCESS_ERRORS or (failed and a.execute != "never"): sys.exit(1)


if __name__ == "__main__": main()
