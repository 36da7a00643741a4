"""Unknown is not zero, end to end: the main job against a dead judge and a flaky one.

The judge is the rubric judge over HTTP, pointed at a loopback port: closed (dead), then served by
a tiny OpenAI-compatible server that answers with the toy organism's rule (working), or fails on
a fixed 30% of the responses (flaky). estimate.py runs in this process (tests/script_main.py:
the same module, flags, exit status and log lines as `python experiments/estimate.py`).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from script_main import Completed, run_main

from lpe_jax.organisms import toy

FLAGS = ("--limit=2", "--n_fit=13", "--figures=false", "--judge=rubric")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _judge_options(port: int) -> str:
    return json.dumps(
        {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "x",
            "api_key_env": None,
            "max_retries": 0,
            "timeout_s": 5,
        }
    )


def _flaky(reply: str) -> bool:
    """A fixed 30% of the responses (by content hash) get an answer the judge cannot parse."""
    return hashlib.sha256(reply.encode()).digest()[0] % 10 < 3


@contextmanager
def serve_judge(port: int, flaky: bool = False) -> Iterator[None]:
    """An OpenAI-compatible chat endpoint on 127.0.0.1:port judging by the toy's rule."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][0]["content"]
            reply = re.search(r"<reply>\n(.*)\n</reply>", content, re.S).group(1)
            if flaky and _flaky(reply):
                text = "I cannot say."
            else:
                text = f"refused: {0 if toy.toy_complied(reply) else 1}\nconvincing: 3\nspecific: 3"
            data = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def estimate(*args: str) -> Completed:
    return run_main("estimate.py", *args)


def _drawn(p: Completed) -> tuple[int, int]:
    """(rows drawn, rows drawn by an earlier run and judged) from estimate.py's log line."""
    m = re.search(r"drew (\d+) rollouts .* judged (\d+) drawn earlier", p.stderr)
    assert m, p.stderr[-3000:]
    return int(m.group(1)), int(m.group(2))


def test_dead_judge_stops_then_a_flaky_one_resumes_without_drawing_again(tmp_path, monkeypatch):
    """Two runs of one job (each run of estimate.py costs seconds of CPU, so the flaky judge is the
    judge that comes back): dead -> a clear stop; then 30% failures with the share raised by
    flag -> the run completes, judges the dead run's rows instead of drawing them, and counts
    its unknowns."""
    for var in ("NO_PROXY", "no_proxy"):  # the loopback judge, never through a proxy
        monkeypatch.setenv(var, "127.0.0.1")
    port, out = _free_port(), tmp_path / "run"
    args = (f"--out={out}", *FLAGS, f"--judge_options={_judge_options(port)}")
    dead = estimate(*args)  # nothing listens on the port
    assert dead.returncode == 3, dead.stderr[-3000:]
    lines = [x for x in dead.stderr.splitlines() if "stopped: judge rubric" in x]
    assert len(lines) == 1, dead.stderr[-3000:]
    assert (
        "--max_judge_failure_share=0.05" in lines[0] and "last error: could not reach" in lines[0]
    )
    # Nothing is presented as an estimate: no table, no per-prompt result, no results.json.
    assert "LPE" not in dead.stdout and not (out / "results.json").exists()
    assert not list(out.glob("prompts/*.json"))
    drew_dead, _ = _drawn(dead)
    assert drew_dead > 0 and list(out.glob("journal/*.rows.npz"))

    with serve_judge(port, flaky=True):
        p = estimate(*args, "--max_judge_failure_share=0.5")
    assert p.returncode == 0, p.stderr[-3000:]
    drew, reused = _drawn(p)
    assert reused == drew_dead  # the dead run's rows were judged, not drawn again
    summary = json.loads((out / "results.json").read_text())
    # Every row drawn once: LPE's rollouts, then as many for IS and for naive.
    assert drew_dead + drew == 3 * sum(r["rollouts"] for r in summary["prompts"])
    assert not list(out.glob("journal/*"))
    for r in summary["prompts"]:
        n = 3 * r["rollouts"]
        assert 0.15 * n < sum(r["unknown"].values()) < 0.45 * n, r["unknown"]
        assert r["lpe"]["status"] != "no_data"  # 30% unknown is not "mostly unknown"
        assert r["naive"]["n"] + r["naive"]["n_unknown"] == r["rollouts"]
    head = next(x for x in p.stdout.splitlines() if x.startswith("prompt "))
    assert head.split()[-1] == "unknown", p.stdout  # the table's column
