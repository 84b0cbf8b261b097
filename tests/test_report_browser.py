"""gc.report's page in a real browser: headless Chromium driven by Playwright.

`.ci/run` installs Debian's chromium where it is missing; elsewhere these tests skip, naming
what is absent.
"""
import json
import os
import re
import shutil

import pytest

import graphc as gc
from graphc.tools import models

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is in the test extra")


def chromium_path():
    for name in (os.environ.get("GRAPHC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no Chromium on this machine "
                                "(.ci/run installs Debian's chromium; GRAPHC_CHROMIUM names another)")


@pytest.fixture(scope="module")
def lenet_page(tmp_path_factory):
    model = models.lenet5(64)
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    path = gc.report(step, tmp_path_factory.mktemp("report") / "lenet.html")
    text = path.read_text()
    block = re.search(r'id="graphc-data">(.*?)</script>', text, re.S).group(1)
    data = json.loads(block)
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        problems, requests = [], []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        yield page, data, problems, requests, path
        browser.close()


def test_page_loads_quickly_without_errors_or_requests(lenet_page):
    page, _, problems, requests, path = lenet_page
    assert problems == []
    assert requests == [path.as_uri()]
    load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    assert 0 < load_ms < 2000


def test_every_node_has_an_svg_element(lenet_page):
    page, data, _, _, _ = lenet_page
    for graph in data["graphs"]:
        ids = page.eval_on_selector_all(f'svg[data-graph="{graph["key"]}"] g.node', "gs => gs.map(g => g.dataset.id)")
        assert sorted(map(int, ids)) == sorted(map(int, graph["nodes"]))


def test_clicking_a_backward_node_shows_its_forward_node_and_kernel(lenet_page):
    page, data, problems, _, _ = lenet_page
    nodes = data["graphs"][1]["nodes"]
    backward = next(n for n in nodes.values() if n["kind"] == "backward" and n["kernels"])
    page.click('nav button[data-tab="backward"]')
    page.click(f'svg[data-graph="backward"] g.node[data-id="{backward["id"]}"]')
    panel = page.inner_text("#panel")
    assert f"gradient of %{backward['forward']} " in panel
    assert backward["rule"] in panel
    kernel = data["kernels"][backward["kernels"][0]]
    assert f"k{kernel['index']} {kernel['label']}" in panel
    assert "define " in page.inner_text("#panel details.ir pre")
    page.click("#panel a.forward-link")
    assert page.get_attribute("#panel .details", "data-node") == str(backward["forward"])
    selected = page.eval_on_selector_all("g.node.selected", "gs => gs.map(g => g.dataset.id)")
    assert selected == [str(backward["forward"])]
    assert problems == []


def test_search_finds_a_node_by_number_and_by_name(lenet_page):
    page, data, problems, _, _ = lenet_page
    page.fill("#search", "%3")
    page.press("#search", "Enter")
    assert page.get_attribute("#panel .details", "data-node") == "3"
    name = next(n["name"] for n in data["graphs"][0]["nodes"].values() if n["name"] == "conv2.w")
    page.fill("#search", name)
    page.press("#search", "Enter")
    assert "conv2.w" in page.inner_text("#panel h3")
    assert "match" in page.inner_text("#search-status")
    assert problems == []


def test_kernel_rows_open_their_code(lenet_page):
    page, data, problems, _, _ = lenet_page
    page.click('nav button[data-tab="kernels"]')
    gemm = next(k for k in data["kernels"] if k["label"].startswith("gemm"))
    page.click(f'tr[data-kernel="{gemm["index"]}"]')
    assert page.get_attribute("#panel .kernel-code", "data-kernel") == str(gemm["index"])
    page.click("#panel details.asm summary")
    assert "ret" in page.inner_text("#panel details.asm pre")
    assert problems == []
