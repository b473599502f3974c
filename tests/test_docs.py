"""The docs site (`make docs`, tools/docs/build.py): the build's pieces, then the built site read in chromium."""
import functools
import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
import typer
from fastcore.nbio import dict2nb

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "_runs" / "screenshots"  # git-ignored test artefacts
EXECUTED_FOR_TEST = ["00_core", "01_features"]  # pages whose outputs the browser test reads (executed if missing)

spec = importlib.util.spec_from_file_location("docs_build", ROOT / "tools" / "docs" / "build.py")
docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs)


def test_title_loses_every_leading_hash():
    assert docs.clean_title("# # Core: settings") == "Core: settings"
    assert docs.clean_title("##  Features") == "Features"
    assert docs.clean_title("Retrieval: # not a heading mark") == "Retrieval: # not a heading mark"
    assert docs.nav_title(Path("03a_adapt.ipynb"), "Adaptation: fine-tuning") == "03a Adaptation"


def test_course_order_puts_companions_after_their_notebook(tmp_path):
    for name in ["index", "10_x", "03a_adapt", "03_retrieval", "00_core", "_hidden"]: (tmp_path / f"{name}.ipynb").touch()
    assert [p.stem for p in docs.course_notebooks(tmp_path)] == ["index", "00_core", "03_retrieval", "03a_adapt", "10_x"]
    assert docs.page_name(Path("03a_adapt.ipynb")) == "adapt"


def cli_command(rows: int = typer.Option(3, help="rows to print"), name: str = typer.Argument(..., help="who")):
    "A CLI command as the modules write them."


def test_typer_parameters_render_as_default_and_help():
    from nbdev.showdoc import show_doc
    docs.patch_typer_signatures()
    md = show_doc(cli_command)._repr_markdown_()
    assert "OptionInfo" not in md and "ArgumentInfo" not in md, md
    assert "rows:int=3" in md and "rows to print" in md and "name:str" in md, md


def test_settings_render_as_their_environment_variables():
    from loyaltylens.core import Settings
    from nbdev.showdoc import show_doc
    docs.patch_typer_signatures()
    md = show_doc(Settings)._repr_markdown_()
    assert "LOYALTYLENS_PG_URL:str | None=None" in md and "_case_sensitive" not in md, md


def test_quarto_cell_options_are_honoured(tmp_path):
    cell = dict2nb({"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                               "source": '#| code-fold: show\n#| code-summary: "Exported source"\ndef f(): pass'}]}).cells[0]
    cell.idx_ = 0
    md = docs.render_code(cell, tmp_path, "p")
    assert md.startswith('???+ source "Exported source"') and "    def f(): pass" in md and "#|" not in md, md
    cell.source = "#| echo: false\nprint(1)"
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    md = docs.render_code(cell, tmp_path, "p")
    assert "print(1)" not in md and "```text\n1\n```" in md, md


def test_cli_reprs_never_reach_a_page(tmp_path):
    repr_out = nbformat.v4.new_output("execute_result", data={"text/plain": "<function __main__.f(n: int = <typer.models.OptionInfo object at 0x7f01>)>"})
    cell = dict2nb({"cells": [{"cell_type": "code", "metadata": {}, "execution_count": 1, "outputs": [repr_out],
                               "source": '#| code-fold: show\n@app.command()\ndef f(n: int = typer.Option(3)): pass\napp.command("g")(f)'}]}).cells[0]
    cell.idx_ = 0
    assert "OptionInfo" not in docs.render_code(cell, tmp_path, "p")  # an exported cell's repr is dropped
    assert "OptionInfo" not in docs.render_output(repr_out, tmp_path, "p", "k")  # and any other shows typer.Option(…)


def test_published_links_become_local_pages():
    url = "https://loyaltylens.github.io/loyaltylens"
    md = f"[`Settings`]({url}/core.html#settings) and [x](https://example.com/core.html)"
    assert docs.relative_site_links(md, url) == "[`Settings`](core.md#settings) and [x](https://example.com/core.html)"


def home_markdown() -> str:
    return "\n".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])


def test_home_page_lists_exactly_the_notebooks_that_exist():
    listed = re.findall(r"^\| \[`(\w+)`\]\(\S+/nbs/(\w+)\.ipynb\) \| \[(\w+)\]\(\S+/(\w+)\.html\)", home_markdown(), flags=re.M)
    existing = [p.stem for p in docs.course_notebooks()[1:]]
    assert [row[0] for row in listed] == existing, "update the notebook table in nbs/index.ipynb"
    for nb, nb_link, page, page_link in listed:
        assert nb == nb_link and page == page_link == docs.page_name(Path(nb + ".ipynb")), (nb, page)


def test_home_page_names_every_setting():
    from loyaltylens.core import Settings
    md = home_markdown()
    missing = [f.alias for f in Settings.model_fields.values() if f"`{f.alias}`" not in md]
    assert missing == [], f"nbs/index.ipynb does not say what these switch on: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The whole course built into a temporary folder from the executed notebooks in _runs/ (the chain writes them)."
    for name in EXECUTED_FOR_TEST:
        run = docs.executed_copy(ROOT / "nbs" / f"{name}.ipynb", execute="missing")
        assert not docs.run_failed(run), f"{run} stopped at an error (its 'papermill-error-cell'): the page would miss outputs"
    tmp = tmp_path_factory.mktemp("docs")
    # a process of its own: nbdev re-runs the exported cells to render `show_doc`, and in this process that would
    # re-register every CLI command on the one `app` with closures over a fresh namespace (a later CLI test would run those)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "docs" / "build.py"), "--site", str(tmp / "site"), "--stage", str(tmp / "stage"),
                        "--execute", "never"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "site"


@pytest.fixture(scope="module")
def served(site):
    "Base URL of the built site on a loopback port of its own."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_site_has_a_page_per_notebook_in_course_order(site):
    pages = [docs.page_name(nb) for nb in docs.course_notebooks()]
    for page in pages: assert (site / f"{page}.html").exists(), page
    html = (site / "index.html").read_text()
    positions = [html.find(f'href="{p}.html"') for p in pages[1:]]
    assert all(p > 0 for p in positions) and positions == sorted(positions), dict(zip(pages[1:], positions))
    assert (site / "assets" / "mermaid.min.js").stat().st_size > 1_000_000  # vendored, not fetched by the browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no system chromium at {CHROMIUM} (Debian package `chromium`)")
def test_site_in_a_browser(served):
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((served, "data:", "blob:")) else None)
        try:
            def visit(name: str):
                page.goto(f"{served}/{name}.html", wait_until="networkidle")
                page.screenshot(path=str(SHOTS / f"docs-{name}.png"), full_page=False)
                return page

            home = visit("index")
            assert home.title().startswith("LoyaltyLens"), home.title()
            home.wait_for_selector("div.mermaid", timeout=20_000)  # material swaps pre.mermaid for a rendered diagram
            assert home.locator("div.mermaid").first.bounding_box()["height"] > 50
            assert home.locator("table a[href='core.html']").count() >= 1  # notebook table links to the pages

            core = visit("core")
            assert not core.locator("h1").first.inner_text().lstrip().startswith("#"), core.locator("h1").first.inner_text()
            glossary = core.locator("table", has=core.locator("th", has_text="term"))
            assert glossary.count() >= 1 and "PSI" in glossary.first.inner_text()
            assert "OptionInfo" not in core.content()
            assert core.locator("details.source pre").count() > 5  # exported definitions show their source
            assert core.locator(".md-footer__link--next").get_attribute("href") == "features.html"
            core.wait_for_selector("div.mermaid", timeout=20_000)

            features = visit("features")
            plots = features.locator(".nb-plot img")
            assert plots.count() >= 1
            assert features.evaluate("img => img.naturalWidth", plots.first.element_handle()) > 100
            plots.first.scroll_into_view_if_needed()
            features.screenshot(path=str(SHOTS / "docs-features-plot.png"))
            bench = features.locator(".nb-html table", has_text="duckdb")
            assert bench.count() >= 1 and "sqlite" in bench.first.inner_text()  # the store benchmark, as a table
            assert features.locator(".md-footer__link--prev").get_attribute("href") == "core.html"

            third = docs.page_name(docs.course_notebooks()[3])
            other = visit(third)
            assert not other.locator("h1").first.inner_text().lstrip().startswith("#")
            assert other.locator(".md-nav__link--active").first.inner_text().strip()[:2].isdigit()
            assert other.locator("pre code").count() > 5 and "OptionInfo" not in other.content()
        finally:
            browser.close()
    assert outside == [], f"the site fetched from outside the machine: {outside[:5]}"
