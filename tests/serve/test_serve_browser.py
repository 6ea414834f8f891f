"""memplan serve in a real headless browser (the system's Chromium, driven by selenium): a person opens the
page, fills the form, and reads figures that are `memplan estimate --json`'s.

Needs chromium and chromedriver (Debian: `apt-get install -y chromium chromium-driver`; `.ci/run` installs
them when missing). Without them these tests fail, saying so, unless MEMPLAN_SKIP_BROWSER_TESTS=1.
MEMPLAN_WRITE_SCREENSHOT=1 rewrites benchmarks/results/serve.png, the README's picture of the page.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import threading
import zipfile
from urllib.request import urlopen

import pytest

from memplan.report.units import gib

from support import REPO

SCREENSHOT = REPO / "benchmarks" / "results" / "serve.png"


def _browser_paths() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.environ.get("MEMPLAN_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("no chromium / chromedriver, and MEMPLAN_SKIP_BROWSER_TESTS=1")
    pytest.fail("the browser tests need chromium and chromedriver on PATH (Debian: apt-get install -y chromium "
                "chromium-driver; .ci/run installs them); MEMPLAN_SKIP_BROWSER_TESTS=1 skips these tests")


@pytest.fixture(scope="module")
def server():
    from memplan.serve.app import make_server

    srv = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _cli_json(run_cli, command_line: str) -> dict:
    args = shlex.split(command_line)
    assert args[0] == "memplan"
    code, out, err = run_cli(*args[1:], "--json")
    assert code in (0, 1), err
    return json.loads(out)


def _by(css: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _submit_and_wait(browser, element):
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_element(*_by("html"))
    element.click()
    WebDriverWait(browser, 30).until(lambda d: old.id != d.find_element(*_by("html")).id)


def _select(browser, key: str, value: str) -> None:
    """Choose `value` in a select: the page estimates at once (its script submits the form)."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    group = browser.find_element(*_by(f"#f-{key}")).find_element("xpath", "ancestor::details")
    if not group.get_attribute("open"):
        group.find_element(*_by("summary")).click()
    old = browser.find_element(*_by("html"))
    Select(browser.find_element(*_by(f"#f-{key}"))).select_by_value(value)
    WebDriverWait(browser, 30).until(lambda d: old.id != d.find_element(*_by("html")).id)


def test_a_newcomer_sees_the_readmes_first_table(browser, server, run_cli):
    browser.get(server + "/")
    assert browser.current_url == server + "/?model=llama-7b&gpus=4"
    expected = _cli_json(run_cli, "memplan estimate --model llama-7b --gpus 4")
    rows = browser.find_elements(*_by("table.plans tbody tr"))
    assert len(rows) == len(expected["results"])
    for row, result in zip(rows, expected["results"]):
        for cell in row.find_elements(*_by("td[data-key]")):
            assert cell.text == gib(result[cell.get_attribute("data-key")])
        assert ("best" in row.get_attribute("class")) == (expected["results"].index(result) == expected["best"])
    # the chosen plan (the best row) by phase: the chart's bars and the command that prints the same
    chosen = _cli_json(run_cli, browser.find_element(*_by("#command")).text)
    r = chosen["results"][0]
    totals = {t.get_attribute("data-phase"): int(t.get_attribute("data-bytes"))
              for t in browser.find_elements(*_by("svg .bar-total"))}
    context = r["overheads"]["cuda_context"]
    assert totals[r["peak_phase"]] == r["total_bytes"]
    assert all(totals[p] == peak + context for p, peak in r["phase_peaks"].items() if p != r["peak_phase"])
    assert browser.find_element(*_by("#verdict")).text == r["fit"]["verdict"]


def test_a_plan_filled_in_the_form_shows_the_figures_of_its_command(browser, server, run_cli):
    browser.get(server + "/?model=llama-7b&gpus=4")
    model = browser.find_element(*_by("#f-model"))
    model.clear()
    model.send_keys("llama-3-8b")
    gpus = browser.find_element(*_by("#f-gpus"))
    gpus.clear()
    gpus.send_keys("1")
    browser.find_element(*_by("#f-gpu")).send_keys("a100-80gb")
    _submit_and_wait(browser, browser.find_element(*_by("#submit")))
    _select(browser, "method", "lora")  # estimates this plan at once
    assert "method=lora" in browser.current_url and "gpu=a100-80gb" in browser.current_url
    command = browser.find_element(*_by("#command")).text
    assert command == ("memplan estimate --model llama-3-8b --gpus 1 --gpu a100-80gb --method lora --max-batch "
                       "--max-seq")
    expected = _cli_json(run_cli, command)
    r = expected["results"][0]
    assert browser.find_element(*_by("#max-batch")).text == str(expected["max_batch"])
    assert browser.find_element(*_by("#max-seq")).text == str(expected["max_seq"])
    for cell in browser.find_elements(*_by("td[data-phase-peak]")):
        assert cell.text == gib(r["phase_peaks"][cell.get_attribute("data-phase-peak")])
    for cell in browser.find_elements(*_by(f'td[data-phase="{r["peak_phase"]}"]')):
        assert cell.text == gib(r["breakdown"][cell.get_attribute("data-term")])
    lines = browser.find_element(*_by("#plan-lines")).text
    assert f"host RAM per node: peak {gib(r['host_peak_bytes'])} GiB" in lines
    assert f"disk: resumable checkpoint {gib(r['disk']['checkpoint_bytes'])} GiB" in lines
    capacity = browser.find_element(*_by("svg line.capacity")).get_attribute("data-bytes")
    usable = browser.find_element(*_by("svg line.usable")).get_attribute("data-bytes")
    assert (int(capacity), int(usable)) == (r["gpu_memory_bytes"], r["fit"]["usable_bytes"])
    # the address is the plan: opened again, it shows the same
    text = browser.find_element(*_by("#results")).text
    browser.get(browser.current_url)
    assert browser.find_element(*_by("#results")).text == text


def test_a_bad_value_shows_the_commands_message_next_to_its_field(browser, server, run_cli):
    browser.get(server + "/?model=llama-7b&gpus=4")
    browser.find_element(*_by("#group-plan summary")).click()
    size = browser.find_element(*_by("#f-batch-size"))
    size.send_keys("0")
    _submit_and_wait(browser, browser.find_element(*_by("#submit")))
    _, _, err = run_cli("estimate", "--model", "llama-7b", "--gpus", "4", "--batch-size", "0")
    assert browser.find_element(*_by("#error-batch-size")).text == err.strip().removeprefix("memplan: error: ")
    assert browser.find_element(*_by("#f-batch-size")).get_attribute("value") == "0"


def test_recommend_with_its_decision_and_files(browser, server, run_cli):
    browser.get(server + "/?model=llama-7b&gpus=4&gpu=a100-80gb")
    browser.find_element(*_by("#group-recommend summary")).click()
    browser.find_element(*_by("#f-dataset-size")).send_keys("20000")
    _submit_and_wait(browser, browser.find_element(*_by("#submit")))
    expected = _cli_json(run_cli, "memplan recommend --model llama-7b --gpus 4 --gpu a100-80gb --dataset-size "
                                  "20000")
    decision = [li.text for li in browser.find_elements(*_by("#decision li"))]
    assert len(decision) == len(expected["decision"])
    assert decision[-1].startswith("=> ") and expected["decision"][-1]["reason"] in decision[-1]
    plan = expected["plan"]
    assert (f"micro-batch {plan['micro_batch']} x {plan['seq_len']} tokens, grad-accum {plan['grad_accum']}"
            in browser.find_element(*_by("#recommended")).text)
    href = browser.find_element(*_by("#download")).get_attribute("href")
    with urlopen(href) as r:
        names = zipfile.ZipFile(io.BytesIO(r.read())).namelist()
    assert "memplan-plan/plan.yaml" in names and "memplan-plan/accelerate_config.yaml" in names


def test_screenshot(browser, server, tmp_path):
    """The README's picture: llama-7b on 4 A100s (the README's table) with the recommendation."""
    browser.get(server + "/?model=llama-7b&gpus=4&gpu=a100-80gb")
    out = SCREENSHOT if os.environ.get("MEMPLAN_WRITE_SCREENSHOT") == "1" else tmp_path / "serve.png"
    assert browser.save_screenshot(str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
