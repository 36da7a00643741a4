"""Test doubles for the scheduler: a NumPy rollout engine with slots and a judge for its rows.

`SyntheticEngine` honours the engine contract (submit / poll / idle, one BlockResult per block
once all its rows finished) with continuous batching over `slots` slots, `steps` decode steps per
poll, and rows whose content is a pure function of (seed, alpha, rollout index):
- token 0 is 1 ("complied") with probability `rate(prompt_key, alpha)`, else 0;
- the row's length is drawn in [1, max_new_tokens]; later tokens are 7;
- log-probs are deterministic numbers of the row.
So a serial oracle (`synthetic_rows`) gives exactly what any interleaving must give.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from lpe_jax.decoding.engine import BlockResult
from lpe_jax.decoding.rollouts import Rollouts
from lpe_jax.decoding.row_block import RowBlock
from lpe_jax.judges.base import JudgeStats, Verdict


def default_rate(prompt_key: Hashable, alpha: float) -> float:
    """log10 rate linear in alpha, capped at 0.9; each prompt its own level."""
    level = int(hashlib.sha256(str(prompt_key).encode()).digest()[0]) / 255.0
    return float(min(0.9, 10 ** (-(2 + 3 * level) * alpha)))


def _uniforms(seed: int, alpha: float, r: int) -> tuple[float, float, float]:
    h = hashlib.sha256(f"{seed}:{round(alpha * 1e6)}:{r}".encode()).digest()
    return tuple(int.from_bytes(h[i : i + 4], "little") / 2**32 for i in (0, 4, 8))


def synthetic_rows(
    prompt_key: Hashable,
    alpha: float,
    seed: int,
    start: int,
    n: int,
    max_new_tokens: int,
    rate: Callable[[Hashable, float], float] = default_rate,
    nonfinite_every: int = 0,
) -> Rollouts:
    """Rows start .. start + n - 1 of stream (prompt, seed, alpha), as a one-alpha Rollouts."""
    t_n = max_new_tokens
    tokens = np.full((n, t_n), -1, np.int32)
    lengths = np.zeros(n, np.int32)
    lp = np.zeros((3, n), np.float32)
    nonfinite = np.zeros(n, bool)
    for i in range(n):
        r = start + i
        u_c, u_len, u_lp = _uniforms(seed, alpha, r)
        length = 1 + int(u_len * t_n)
        tokens[i, :length] = 7
        tokens[i, 0] = int(u_c < rate(prompt_key, alpha))
        lengths[i] = length
        lp[:, i] = (
            -length * (1 + u_lp),
            -length * (1 + alpha * u_lp),
            -length * (1 + (1 - alpha) * u_lp / 2),
        )
        nonfinite[i] = bool(nonfinite_every) and r % nonfinite_every == nonfinite_every - 1
    lp[:, nonfinite] = np.nan
    return Rollouts(
        tokens=tokens[None],
        lengths=lengths[None],
        logp_original=lp[0][None],
        logp_variant=lp[1][None],
        logp_sampled=lp[2][None],
        truncated=(lengths == t_n)[None],
        nonfinite=nonfinite[None],
        alphas=np.array([alpha], np.float64),
        rollout_offset=start,
    )


class SyntheticEngine:
    """Continuous batching over `slots` slots; `steps` decode steps per poll.

    Observers: `on_poll()` is called at the start of every poll (tests record what the judge is
    doing then); `slot_steps_used` / `slot_steps` count slot use.
    """

    def __init__(
        self,
        *,
        slots: int = 16,
        steps: int = 4,
        max_new_tokens: int = 12,
        rate: Callable[[Hashable, float], float] = default_rate,
        nonfinite_every: int = 0,
        on_poll: Callable[[], None] | None = None,
    ) -> None:
        self.slots, self.steps, self.max_new_tokens = slots, steps, max_new_tokens
        self.rate, self.nonfinite_every, self.on_poll = rate, nonfinite_every, on_poll
        self.queue: collections.deque[tuple[RowBlock, int]] = collections.deque()
        self.live: list[list] = []  # [block, row index, remaining steps]
        self.rows_left: dict[int, int] = {}
        self.rows: dict[int, Rollouts] = {}
        self.polls = self.slot_steps = self.slot_steps_used = 0
        self.submitted_rows = 0

    def submit(self, block: RowBlock) -> None:
        if block.count < 1:
            raise ValueError("count must be >= 1")
        self.rows[id(block)] = self._rows(block)
        self.rows_left[id(block)] = block.count
        self.submitted_rows += block.count
        for i in range(block.count):
            self.queue.append((block, i))

    @property
    def idle(self) -> bool:
        return not self.queue and not self.live

    def poll(self) -> list[BlockResult]:
        if self.on_poll is not None:
            self.on_poll()
        self.polls += 1
        done: list[BlockResult] = []
        for _ in range(self.steps):
            while self.queue and len(self.live) < self.slots:
                block, i = self.queue.popleft()
                self.live.append([block, i, int(self.rows[id(block)].lengths[0, i])])
            self.slot_steps += self.slots
            self.slot_steps_used += len(self.live)
            for row in self.live:
                row[2] -= 1
            for block, _, _ in [r for r in self.live if r[2] <= 0]:
                self.rows_left[id(block)] -= 1
                if self.rows_left[id(block)] == 0:
                    done.append(BlockResult(block, self.rows.pop(id(block))))
            self.live = [r for r in self.live if r[2] > 0]
        return done

    def _rows(self, block: RowBlock) -> Rollouts:
        return synthetic_rows(
            block.prompt_key,
            block.alpha,
            block.seed,
            block.rollout_start,
            block.count,
            self.max_new_tokens,
            self.rate,
            self.nonfinite_every,
        )


def decode(ids: list[int]) -> str:
    """Response text of a synthetic row: 'sure' or 'no' (token 0), then its length."""
    return f"{'sure' if ids and ids[0] == 1 else 'no'} {len(ids)}"


class SyntheticJudge:
    """complied = the response starts with 'sure'; deterministic failure modes; hooks.

    unknown_mod: rows whose length is a multiple of it get complied=None (0: never).
    raise_on_call: the call numbers (1-based) that raise. before_call(n_items) runs in the judge
    thread before judging; `running` is set while a call is inside judge().
    """

    judge_id = "synthetic"

    def __init__(
        self,
        unknown_mod: int = 0,
        raise_on_call: tuple[int, ...] = (),
        before_call: Callable[[int], None] | None = None,
    ) -> None:
        self.stats = JudgeStats()
        self.unknown_mod, self.raise_on_call = unknown_mod, raise_on_call
        self.before_call = before_call
        self.calls = self.items = self.completed_items = 0
        self.running = threading.Event()

    def judge(self, items):
        self.calls += 1
        call = self.calls
        self.running.set()
        try:
            if self.before_call is not None:
                self.before_call(len(items))
            if call in self.raise_on_call:
                raise ConnectionError("judge endpoint down")
            self.items += len(items)
            out = []
            for _, response in items:
                word, length = response.split()
                if self.unknown_mod and int(length) % self.unknown_mod == 0:
                    out.append(Verdict(None, self.judge_id, reason="timeout"))
                else:
                    out.append(Verdict(word == "sure", self.judge_id))
            self.completed_items += len(items)
            return out
        finally:
            self.running.clear()


class SamplerEngine:
    """The engine contract served by PairedSampler.sample, one block per call, out of order.

    Every poll samples up to `per_poll` queued blocks and returns the finished ones in reverse,
    holding the last back until the next poll (so blocks come back late and shuffled).
    """

    def __init__(self, sampler: Any, per_poll: int = 3) -> None:
        self.sampler, self.per_poll = sampler, per_poll
        self.queue: collections.deque[RowBlock] = collections.deque()
        self.held: list[BlockResult] = []
        self.calls = 0

    def submit(self, block: RowBlock) -> None:
        self.queue.append(block)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.held

    def poll(self) -> list[BlockResult]:
        done = self.held
        for _ in range(min(self.per_poll, len(self.queue))):
            b = self.queue.popleft()
            r = self.sampler.sample(
                b.prompt_ids, [b.alpha], b.count, seed=b.seed, rollout_offset=b.rollout_start
            )
            self.calls += 1
            done.append(BlockResult(b, r))
        self.held = done[-1:] if self.queue else []
        return done[::-1][len(self.held) :]
