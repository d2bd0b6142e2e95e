"""The HTML report renders in a real browser (headless Chromium) and shows every client's ε."""

import shutil
import subprocess

import pytest

from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.report import write_report
from fedlora.privacy.report_render import format_epsilon
from fedlora.privacy.runfile import RunFacts, save_run_ledgers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian package 'chromium' is not installed (apt-get install chromium)"
)
def test_headless_chromium_shows_every_clients_epsilon(tmp_path):
    ledgers = {}
    for i, steps in enumerate((4, 9, 16)):
        ledger = PrivacyLedger(f"node-{i}", "record", 1e-5, 1.0)
        for rnd in (1, 2):
            ledger = ledger.record(rnd, 1.0, 0.25, steps)
        ledgers[ledger.client_id] = ledger
    save_run_ledgers(tmp_path / "run", ledgers, RunFacts.create("record", delta=1e-5))
    html = write_report(tmp_path / "run", with_prv=False)["html"]
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        html.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "<h1>Privacy report</h1>" in dom
    for cid, ledger in ledgers.items():
        assert cid in dom
        assert format_epsilon(ledger.epsilon("rdp")) in dom
    assert 'src="data:image/png;base64,' in dom
