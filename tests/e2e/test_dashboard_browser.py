"""The dashboard as its admin uses it: Debian's chromium (headless, through selenium and Debian's
chromedriver) against a live bootstrap with two peers (started at once, unpinned) and a trainer on the
plain loop. It logs in, watches the fleet table fill (CPU peers say so in the GPU columns), sees the
alert of a stage down to one replica on the page (and the test's webhook receives it), watches the
loss chart draw a line over distinct steps, checks that the audit table stays inside the page,
creates a key and revokes it, and saves a screenshot in the test's output directory."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from bootstrap.admin import set_admin_password
from tests.helpers import Webhook

pytestmark = pytest.mark.slow

PASSWORD = "browser-test-password"


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromedriver are needed: scripts/install.sh installs them (apt)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_admin_uses_the_dashboard(model_factory, swarm_factory, tmp_path: Path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    webhook = Webhook()
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=2,
                          num_peers=0, pin_stages=False, target_batch_size=2, metrics_interval=0.3,
                          alert_webhook=webhook.url)
    swarm.add_peers_at_once(2)
    node = swarm.bootstrap
    set_admin_password(node.db, "admin", PASSWORD, actor="test")
    stop = threading.Event()
    steps: list[float] = []

    def train() -> None:
        with swarm.client() as model:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            batch = torch.randint(0, 64, (2, 8))
            while not stop.is_set() and len(steps) < 400:
                loss = model(batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                steps.append(loss.item())
                model.report_progress(len(steps), steps[-1], 1.0)
                stop.wait(0.2)

    trainer = threading.Thread(target=train, name="trainer")
    trainer.start()
    browser = _browser()
    try:
        # the page redraws its tables every few seconds: an element found just before a redraw goes
        # stale, and the wait simply looks again
        wait = WebDriverWait(browser, 60, poll_frequency=0.3,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
        browser.get(node.dashboard.url + "/")
        wait.until(lambda b: b.current_url.endswith("/login"))
        browser.find_element(By.ID, "username").send_keys("admin")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_element(By.ID, "run-id").text == swarm.run_id)

        def peer_column(b) -> set[str] | None:
            rows = b.find_elements(By.CSS_SELECTOR, "#peers tbody tr")
            return {row.find_elements(By.TAG_NAME, "td")[0].text for row in rows} if len(rows) == 2 else None

        assert wait.until(peer_column) == {p.peer_id for p in swarm.peers}
        assert browser.find_element(By.ID, "peer-count").text == "2"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#pipeline .stage")) == 2
        headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#peers thead th")]
        assert headers[3:11] == ["tokens/s", "link latency", "device", "GPU util", "GPU memory", "GPU temp",
                                 "GPU power", "CPU"]
        def online_row(b) -> list[str] | None:  # a peer's record says loading until its stage is served
            row = [td.text for td in b.find_elements(By.CSS_SELECTOR, "#peers tbody tr")[0].find_elements(By.TAG_NAME, "td")]
            return row if row[2] == "online" else None

        row = wait.until(online_row)
        assert row[6:10] == ["CPU"] * 4  # CPU peers: no GPU figures to show
        assert row[4] == "—" or row[4].endswith(" ms")
        assert row[5].startswith("cpu (no GPU), ")
        # a GPU peer's record (the per-GPU stats of HardwareSummary.gpus): one line per GPU in each column
        gpu_row = browser.execute_script(
            "const tr = document.createElement('tr'); gpuCells(tr, {device: 'cuda', gpu_count: 2, gpus: ["
            "{index: 0, name: 'NVIDIA H100', util_percent: 81.4, memory_used_gib: 20.5, memory_total_gib: 79.6,"
            " temperature_c: 66, power_w: 310.2},"
            "{index: 1, name: 'NVIDIA H100', util_percent: 77, memory_used_gib: 19, memory_total_gib: 79.6,"
            " temperature_c: null, power_w: null}]});"
            "return [...tr.children].map((td) => td.textContent);")
        assert gpu_row == ["81 %\n77 %", "20.5 / 79.6 GiB\n19.0 / 79.6 GiB", "66 °C\n—", "310 W\n—"], gpu_row

        # two stages of one replica each: the alerts are on the page and reached the webhook
        one_replica = ("stage 0 is down to one replica", "stage 1 is down to one replica")
        wait.until(lambda b: all(t in b.find_element(By.ID, "alerts").text for t in one_replica))
        assert "stage 0 has one replica" in browser.find_element(By.ID, "warnings").text  # swarm status's warnings
        assert {"stage.one:0", "stage.one:1"} <= {a["key"] for a in webhook.received}
        assert not browser.find_element(By.ID, "data-cards").is_displayed()  # no dataset in this run

        points = lambda b: int(b.find_element(By.ID, "points").text)  # noqa: E731
        wait.until(lambda b: points(b) >= 2)
        before = points(browser)
        wait.until(lambda b: points(b) >= before + 3)  # live: new points arrive without a reload
        assert float(browser.find_element(By.ID, "loss").text) > 0
        drawn = browser.execute_script("const u = window.lossChart; return [u.data[0].length, u.scales.x.min, "
                                       "u.scales.x.max, u.scales.y.min, u.scales.y.max, u.data[0]];")
        assert 2 <= drawn[0] <= points(browser) and drawn[1] < drawn[2] and drawn[3] < drawn[4], drawn
        assert drawn[5] == sorted(set(drawn[5])), drawn  # one point per step, in step order: a line
        browser.find_element(By.CSS_SELECTOR, "#peers tbody tr button.history").click()
        wait.until(lambda b: not b.find_element(By.ID, "peer-history").get_attribute("hidden")
                   and b.find_element(By.ID, "history-peer").text in {p.peer_id for p in swarm.peers})

        browser.find_element(By.ID, "key-name").send_keys("volunteer from the browser")
        browser.find_element(By.ID, "create-key").click()
        secret_text = wait.until(lambda b: b.find_element(By.ID, "new-secret").text or None)
        secret = secret_text.rsplit(" ", 1)[1]
        key = node.db.verify_key(secret)
        assert key.name == "volunteer from the browser"
        def revoke(b) -> bool:
            b.find_element(By.CSS_SELECTOR, f"#keys tr[data-key-id='{key.id}'] button.revoke").click()
            return True

        wait.until(revoke)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f"#keys tr[data-key-id='{key.id}']")
                   .find_elements(By.TAG_NAME, "td")[3].text == "revoked")
        assert [k.revoked is not None for k in node.db.list_keys()] == [True]
        wait.until(lambda b: "key.revoke" in b.find_element(By.ID, "audit").text)
        widths = browser.execute_script("const main = document.querySelector('main').getBoundingClientRect(); "
                                        "const audit = document.getElementById('audit').getBoundingClientRect(); "
                                        "return [audit.right, main.right, document.documentElement.scrollWidth, "
                                        "window.innerWidth];")
        assert widths[0] <= widths[1] and widths[2] <= widths[3], widths  # the audit table stays on the page
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        browser.set_window_size(1200, 5000)
        browser.save_screenshot(str(tmp_path / "dashboard-full.png"))
        print(f"screenshots: {tmp_path}")
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        browser.quit()
        stop.set()
        trainer.join(timeout=60)
        webhook.stop()
    assert len(steps) >= 3 and all(torch.isfinite(torch.tensor(steps)))
