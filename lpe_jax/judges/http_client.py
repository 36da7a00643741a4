"""A minimal client for OpenAI-compatible ``/chat/completions`` endpoints (stdlib only).

Each HTTP attempt is a blocking ``urllib`` call run in a worker thread; the retry loop runs on an
asyncio event loop so that waits between attempts hold no thread. Retried: HTTP 429, HTTP 5xx,
timeouts and dropped connections, with exponential backoff (``backoff_s * 2**attempt``, jittered,
capped at ``max_backoff_s``) or the server's ``Retry-After`` when that is longer, up to
``max_retry_after_s`` (default 120 s; a longer request is cut to it and logged as a warning, so a
``Retry-After: 3600`` cannot hold an item for an hour per attempt). Not retried (the
answer would not change): other 4xx, a non-JSON body, a body without ``choices[0].message.content``.
Every failure comes back as a ``ChatResult`` with ``text=None`` and a reason; nothing raises.

The API key is read from the named environment variable at each attempt and never kept on the
object; it is masked out of every reason string.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import http.client
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

_RETRY_STATUS = frozenset({408, 425, 429})  # plus every status >= 500
_BODY_SNIPPET = 300  # characters of an error body quoted in a reason
MAX_RETRY_AFTER_S = 120.0  # longest wait a server's Retry-After gets per attempt (by default)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatResult:
    """Outcome of one chat completion after retries.

    text: the assistant message content, or None on failure (then ``reason`` says why).
    attempts: HTTP attempts made (>= 1). prompt_tokens / completion_tokens: reported usage, or 0.
    """

    text: str | None
    reason: str = ""
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class _Attempt:
    text: str | None = None
    reason: str = ""
    retryable: bool = False
    retry_after_s: float | None = None
    usage: tuple[int, int] = (0, 0)


def chat_url(base_url: str) -> str:
    """``{base_url}/chat/completions`` (kept as is when base_url already ends with it)."""
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ValueError(
            f"base_url must start with http:// or https://, got {base_url!r} "
            "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)"
        )
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or ``retry-after-ms``; None if
    absent or unreadable. Never negative."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class ChatClient:
    """Posts one user message to an OpenAI-compatible chat-completions endpoint.

    temperature / max_tokens: sent when not None (some hosted reasoning models reject a
    temperature other than their default: pass None, and put e.g. ``max_completion_tokens`` in
    ``extra_body``). extra_body: more request fields, merged last. max_retry_after_s: cap on a
    server's ``Retry-After`` (seconds; longer requests are cut to it, with a logged warning).
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_retry_after_s: float = MAX_RETRY_AFTER_S,
        temperature: float | None = 0.0,
        max_tokens: int | None = 512,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = chat_url(base_url)
        if not model:
            raise ValueError("model must name the judge model served at base_url")
        waits = (backoff_s, max_backoff_s, max_retry_after_s)
        if timeout_s <= 0 or min(waits) < 0 or max_retries < 0:
            raise ValueError(
                "need timeout_s > 0, backoff_s, max_backoff_s, max_retry_after_s >= 0 and "
                f"max_retries >= 0; got {timeout_s}, {waits}, {max_retries}"
            )
        self.api_key_env = api_key_env or None
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(
                f"environment variable {self.api_key_env} is unset or empty; export the API key "
                'there, or for a server that needs no key set "api_key_env": null in '
                "--judge_options (api_key_env=None in Python)"
            )
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})

    def _body(self, content: str) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _mask(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def post_once(self, content: str) -> _Attempt:
        """One blocking HTTP attempt (run it in a worker thread)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, self._body(content), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as e:
            return self._http_error(e)
        except TimeoutError:
            return _Attempt(reason=f"timed out after {self.timeout_s:g} s", retryable=True)
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                return _Attempt(reason=f"timed out after {self.timeout_s:g} s", retryable=True)
            return _Attempt(reason=f"could not reach {self.url}: {e.reason}", retryable=True)
        except (OSError, http.client.HTTPException) as e:
            return _Attempt(reason=f"connection failed: {type(e).__name__}: {e}", retryable=True)
        return _parse_reply(payload)

    def _counted(self, on_attempt: Callable[[int], None], content: str) -> _Attempt:
        on_attempt(1)
        try:
            return self.post_once(content)
        finally:
            on_attempt(-1)

    def _http_error(self, e: urllib.error.HTTPError) -> _Attempt:
        try:
            body = e.read().decode("utf-8", "replace")[:_BODY_SNIPPET]
        except (OSError, http.client.HTTPException):
            body = ""
        retryable = e.code in _RETRY_STATUS or e.code >= 500
        hint = ""
        if e.code in (401, 403) and self.api_key_env:
            hint = f" (check the key in ${self.api_key_env})"
        elif e.code in (401, 403):
            hint = " (the server wants a key: pass api_key_env naming its variable)"
        return _Attempt(
            reason=f"HTTP {e.code}{hint}: {body.strip()}",
            retryable=retryable,
            retry_after_s=parse_retry_after(e.headers),
        )

    def _delay(self, attempt: int, retry_after_s: float | None) -> float:
        backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        if retry_after_s is None:
            return backoff
        if retry_after_s > self.max_retry_after_s:
            log.warning(
                "%s asked to retry after %.0f s; waiting %.0f s (max_retry_after_s)",
                self.url,
                retry_after_s,
                self.max_retry_after_s,
            )
            retry_after_s = self.max_retry_after_s
        return max(backoff, retry_after_s)

    async def complete(
        self,
        content: str,
        executor: Executor | None = None,
        on_attempt: Callable[[int], None] | None = None,
    ) -> ChatResult:
        """Send ``content`` as one user message; retry as described in the module docstring.

        on_attempt(+1 / -1): called as each HTTP attempt starts and ends (in its thread).
        """
        loop = asyncio.get_running_loop()
        attempt = 0
        post = self.post_once
        if on_attempt is not None:
            post = functools.partial(self._counted, on_attempt)
        while True:
            result = await loop.run_in_executor(executor, post, content)
            attempt += 1
            if result.text is not None:
                return ChatResult(result.text, "", attempt, *result.usage)
            if not result.retryable or attempt > self.max_retries:
                tail = f" (after {attempt} attempts)" if attempt > 1 else ""
                return ChatResult(None, self._mask(result.reason) + tail, attempt)
            await asyncio.sleep(self._delay(attempt - 1, result.retry_after_s))


def _parse_reply(payload: bytes) -> _Attempt:
    """Pull ``choices[0].message.content`` (and usage) out of a 200 reply."""
    snippet = payload[:_BODY_SNIPPET].decode("utf-8", "replace")
    try:
        data = json.loads(payload)
    except ValueError:
        return _Attempt(reason=f"endpoint answered non-JSON: {snippet!r}")
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return _Attempt(reason=f"reply lacks choices[0].message.content: {snippet!r}")
    if not isinstance(content, str):
        return _Attempt(reason=f"choices[0].message.content is not text: {snippet!r}")
    usage = data.get("usage") if isinstance(data, dict) else None
    tokens = (0, 0)
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        tokens = (p if isinstance(p, int) else 0, c if isinstance(c, int) else 0)
    return _Attempt(text=content, usage=tokens)
