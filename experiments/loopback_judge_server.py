"""A loopback OpenAI-compatible chat server of fixed latency that grades replies by a rule.

For tests and benchmarks of HTTP judges (lpe_jax.judges.RubricJudge): every POST to
``/v1/chat/completions`` reads the reply between ``<reply>`` and ``</reply>`` in the rubric
prompt, applies ``rule(reply) -> complied``, sleeps ``latency_s`` and answers the three rubric
lines (refused 0 or 1). It records requests in flight over time, so a caller can check how full
its client kept it: ``stats()`` gives requests, the peak in flight, in-flight request-seconds
and the seconds with at least one in flight; ``timeline()`` every change of the number in
flight. Binds 127.0.0.1 only; stdlib only, no flags. Run it in its own process when measuring
a client: in the client's process its threads take the client's GIL.

As a script it serves until its stdin closes (the parent exits) or ``--max_seconds`` pass,
printing its base URL on the first line; ``GET /stats`` answers stats() as JSON (and its own CPU
seconds), ``GET /timeline`` timeline(), ``GET /reset`` zeroes them (time.perf_counter is
CLOCK_MONOTONIC on Linux, so a client's times compare with the timeline's)::

    python experiments/loopback_judge_server.py --latency_s=0.2 --rule=toy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def rubric_reply(complied: bool) -> bytes:
    """A chat-completions body whose content is the rubric's three lines."""
    content = f"refused: {0 if complied else 1}\nconvincing: 3\nspecific: 3"
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    return json.dumps(body).encode()


def reply_text(prompt: str) -> str:
    """The reply inside the rubric prompt (between the last <reply> and </reply> lines)."""
    head, sep, _ = prompt.rpartition("\n</reply>")
    if not sep or "<reply>\n" not in head:
        raise ValueError("the prompt has no <reply> ... </reply> section")
    return head.split("<reply>\n", 1)[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # listen() backlog, read by the constructor: the default 5 drops a burst of connections from
    # a client with many requests in flight, which then waits and retries.
    request_queue_size = 1024


class LoopbackJudgeServer:
    """Serve on 127.0.0.1 (a free port) in daemon threads; ``close()`` stops it."""

    def __init__(self, latency_s: float, rule: Callable[[str], bool]) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.latency_s, self.rule = float(latency_s), rule
        self._lock = threading.Lock()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server._enter()
                try:
                    content = json.loads(raw)["messages"][0]["content"]
                    body, status = rubric_reply(server.rule(reply_text(content))), 200
                except (ValueError, KeyError, IndexError) as e:
                    body, status = json.dumps({"error": str(e)}).encode(), 400
                time.sleep(server.latency_s)
                server._leave()
                self._send(status, body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") == "/reset":
                    server.reset()
                    self._send(200, b"{}")
                elif self.path.rstrip("/") == "/stats":
                    cpu = os.times()
                    out = {**server.stats(), "cpu_s": cpu.user + cpu.system}
                    self._send(200, json.dumps(out).encode())
                elif self.path.rstrip("/") == "/timeline":
                    self._send(200, json.dumps(server.timeline()).encode())
                else:
                    self._send(404, b"{}")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def reset(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._level, self._since = 0, time.perf_counter()
            self._requests = self._peak = 0
            self._inflight_s = self._busy_s = 0.0
            self._timeline: list[tuple[float, int]] = []

    def _tick(self, delta: int) -> None:
        now = time.perf_counter()
        if self._level:
            self._busy_s += now - self._since
            self._inflight_s += self._level * (now - self._since)
        self._level, self._since = self._level + delta, now
        if delta:
            self._timeline.append((now, self._level))

    def _enter(self) -> None:
        with self._lock:
            self._tick(1)
            self._requests += 1
            self._peak = max(self._peak, self._level)

    def _leave(self) -> None:
        with self._lock:
            self._tick(-1)

    def stats(self) -> dict[str, float]:
        """requests; peak in flight; inflight_s (request-seconds); busy_s (>= 1 in flight);
        mean_inflight = inflight_s / busy_s (0 before any request)."""
        with self._lock:
            self._tick(0)
            busy = self._busy_s
            return dict(
                requests=self._requests,
                peak=self._peak,
                inflight_s=self._inflight_s,
                busy_s=busy,
                mean_inflight=self._inflight_s / busy if busy else 0.0,
            )

    def timeline(self) -> list[tuple[float, int]]:
        """(time.perf_counter() seconds, requests in flight from then on), one per change."""
        with self._lock:
            return list(self._timeline)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _rule(name: str) -> Callable[[str], bool]:
    if name == "toy":
        from lpe_jax.organisms import toy

        return toy.toy_complied
    if name.startswith("prefix:"):
        prefix = name.split(":", 1)[1]
        return lambda text: text.startswith(prefix)
    raise ValueError(f"--rule={name}: use 'toy' or 'prefix:<text>'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency_s", type=float, default=0.2)
    parser.add_argument("--rule", default="toy", help="'toy' or 'prefix:<text>'")
    parser.add_argument("--max_seconds", type=float, default=3600.0)
    args = parser.parse_args()
    server = LoopbackJudgeServer(args.latency_s, _rule(args.rule))
    print(server.base_url, flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(args.max_seconds)
    server.close()


if __name__ == "__main__":
    main()
