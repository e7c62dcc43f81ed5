"""The walkthroughs of the README and docs/, run as pasted (each section's shell blocks as one
bash script, against a real relay), so a step that fails or races for a newcomer fails here
first."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from relay.config import SETTINGS
from tests.relay_process import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SUBSCRIPTIONS = ROOT / "docs" / "SUBSCRIPTIONS.md"
CORRECTIONS = ROOT / "docs" / "CORRECTIONS.md"


def _section_script(doc: Path, heading: str) -> str:
    """The ``sh`` blocks of one ``## heading`` section of ``doc``, joined in order."""
    text = doc.read_text()
    assert f"\n## {heading}\n" in text, f"{doc.name} has no section {heading!r}"
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, f"no sh block under {heading!r}"
    return "\n".join(blocks)


def _run_section(relay: RelayProcess, doc: Path, heading: str) -> str:
    """Run a section against ``relay`` (the doc's URL rewritten to its port); its stdout."""
    relay.start()
    try:
        script = _section_script(doc, heading).replace("http://127.0.0.1:4437", relay.url)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        relay.kill()
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_curl_walkthrough_runs_as_pasted(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", "--long-poll-timeout", "20")
    out = _run_section(relay, README, "Walkthrough with curl")
    assert out.count("HTTP/1.1 201 Created") == 1  # the create
    assert "Hello, world" in out  # the catch-up read
    assert "\ndata:  More.\n" in out  # the SSE reader saw the live append
    assert "first: 200\nretry: 204\n" in out  # the idempotent producer step
    # The long-poll was woken by the POST (200 with its byte), not ended by its timeout (204).
    assert re.search(r"HTTP/1.1 200 OK\r?\n(?:[^\n]+\n)*\r?\n!", out), out[-3000:]


def test_the_subscriptions_walkthrough_runs_as_pasted(tmp_path: Path) -> None:
    out = _run_section(RelayProcess(tmp_path / "data"), SUBSCRIPTIONS, "Walkthrough")
    assert '"subscription_id":"indexer"' in out  # the wake event arrived before the claim
    assert '{"ok":true,"next_wake":false}' in out  # the claim and its ack


def test_the_subscriptions_walkthrough_runs_on_postgres_with_two_workers(
    tmp_path: Path, pg_url: str
) -> None:
    relay = RelayProcess(tmp_path / "data", "--database-url", pg_url, "--workers", "2")
    out = _run_section(relay, SUBSCRIPTIONS, "Walkthrough")
    assert '{"ok":true,"next_wake":false}' in out


def test_the_supersede_recipe_runs_as_pasted(tmp_path: Path) -> None:
    out = _run_section(RelayProcess(tmp_path / "data"), CORRECTIONS, "Supersede")
    assert 'rel="successor-version"' in out and "/v1/stream/answer-2>" in out
    assert out.rstrip().endswith("The capital is Paris.")


def test_the_retention_recipe_runs_as_pasted(tmp_path: Path) -> None:
    out = _run_section(RelayProcess(tmp_path / "data"), CORRECTIONS, "Retention")
    assert "retain: 200\nnew\nbefore: 410\n" in out


def test_the_compaction_recipe_runs_as_pasted(tmp_path: Path) -> None:
    out = _run_section(
        RelayProcess(tmp_path / "data"), CORRECTIONS, "Compacting a State Protocol stream"
    )
    assert "Stream-Compacted: messages=3; rows=1; history-bytes=" in out
    assert '"text":"draft 3"' in out and "draft 1" not in out and "snapshot-start" in out


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    """A newcomer finds every flag in the README's table, not only in ``relay serve --help``."""
    text = README.read_text()
    rows = {s.name for s in SETTINGS if f"| `--{s.name.replace('_', '-')}` |" in text}
    assert [s.name for s in SETTINGS if s.name not in rows] == []
