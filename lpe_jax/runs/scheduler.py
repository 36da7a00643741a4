"""Run many per-prompt jobs at once on one rollout engine, with judging overlapped with decoding.

A *job* is a generator that asks for rollouts and gets them back judged::

    def job():
        a = yield Draw(alpha=0.5, n=10, seed=s)            # one draw: receives a Drawn
        b, c = yield [Draw(0.0, 80, s0), Draw(1.0, 80, s1)]  # several at once: a list of Drawn
        yield Ahead([Draw(0.0, 30, s2)])                    # start now, collect later: gets None
        later = yield Collect()                             # every Ahead draw not yet collected
        return something                                    # what Scheduler.run yields for it

A job's requests may depend only on what it was sent. ``Ahead`` draws are for rows whose number
is known before the verdicts the job waits on (e.g. importance and naive rows at a budget that
grows with each adaptive draw): the engine and the judge work on them while the job's next draw
waits, after every waited draw's rows (engine queue and judge queue), so they fill idle capacity
without delaying the adaptive draws much. `search_job` wraps an estimator search
(e.g. `lpe.adaptive_search`, which yields DrawRequest and receives DrawResult) into such a job.

`Scheduler.run` is one single-threaded event loop; only the judge runs beside it, in a small pool
of worker threads::

    admit jobs -> their draws become RowBlocks (per-stream rollout offsets) -> engine.submit
    engine.poll (one generate call) -> finished blocks -> bounded judge queue -> worker threads
    verdicts -> a job's yield complete? -> send the Drawn(s), collect its next draws

A judge with a ``concurrency`` attribute (e.g. RubricJudge: HTTP requests in flight) is kept
full: each finished block, of any prompt and draw, is its own judge call as soon as it is
finished, from as many threads as needed, while fewer than JUDGE_QUEUE x concurrency rows are in
its calls (a full set in flight, the rest queued inside the judge so it never waits for the
loop). A latency-bound judge then judges at concurrency / latency whenever that many rows are
pending, and a draw waits only for its own blocks. Other judges get merged batches on
``judge_workers`` threads.

Guarantees:
- Same seed, same run: draw d of stream (prompt, seed, alpha) gets rollout indices following the
  stream's earlier draws, in the order the owning job yielded them (Ahead draws included, at
  the yield that names them), never reused; a stream
  belongs to one job (another job drawing from it is an error). A row's randomness depends only
  on (seed, alpha, rollout index), so every job sees what it would see if it ran alone and
  serially, whatever the interleaving, block split, engine order or judge timing.
- Bounded work in flight: rows submitted to the engine and not yet judged never exceed
  `max_inflight_rows`, so a fast device cannot flood a slow judge; the device keeps decoding
  while the judge works on earlier rows, so a slow judge does not idle it either.
- A judge failure is unknown: a verdict of None, or a judge call that raises, gives -1 (logged),
  never 0. Rows stopped on non-finite logits are never judged (-1).
- A failing judge stops the run (``max_judge_failure_share``): rows with judge failures are held
  back from their jobs until the last ``judge_failure_window`` judged rows can say whether the
  judge works (or nothing else is in flight). Within the share they are delivered, and their
  unknown verdicts are final; above it (before the window fills: more than share x window
  failed rows), ``run`` finishes every row already drawn, keeps the rows no job was sent
  (``unjudged()``: tokens included, to journal) and raises :class:`JudgeFailedError`. A rerun
  passes them back to ``add(rows=...)``: they are judged again, not drawn again.

Host only: NumPy and threads; the engine is passed in (duck-typed, see `Engine`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from lpe_jax.decoding.row_block import ALPHA_QUANTUM, RowBlock
from lpe_jax.estimators.lpe import DrawRequest, DrawResult
from lpe_jax.judges.base import Judge

__all__ = [
    "ALPHA_QUANTUM",
    "Ahead",
    "Collect",
    "Draw",
    "Drawn",
    "Engine",
    "Job",
    "JobPrompt",
    "JudgeFailedError",
    "SavedRows",
    "Scheduler",
    "SchedulerStats",
    "judge_rows",
    "judge_utilisation",
    "search_job",
]

log = logging.getLogger(__name__)


UNKNOWN = -1

JUDGE_QUEUE = 4
"""A judge with ``concurrency`` c gets up to this many x c rows in its calls at once. The rows of
a call count until the loop collects it, answered ones included, so 2 x c left the judge short
(0.87-0.90 c in flight on average while rows were pending, loopback test on the loaded 2-core
box); 4 x c kept 0.95-0.97 c."""

AHEAD_JUDGE = 2
"""Rows of Ahead draws go to a judge with concurrency c only while its running calls hold fewer
than this many x c rows (counted by the judge threads as calls start and end): the judge's own
queue then holds about c of them at most, so a waited draw's rows, handed over later, wait about
one latency behind them, while the judge still has a full set to work on."""

AHEAD_BLOCK_DIV = 4
"""Ahead draws are cut into blocks of block_rows // this many rows (at least 1)."""

AHEAD_INFLIGHT = 0.5
"""Ahead draws' rows in flight (submitted, not yet judged) stay within this share of
``max_inflight_rows``; the rest is kept for waited draws, which never wait for Ahead rows to be
judged before they can be submitted."""


class JudgeFailedError(RuntimeError):
    """The judge failed on more than ``max_share`` of the last ``window`` judged rows.

    failed / window: rows the judge gave no verdict for / rows judged, in the window; last_error:
    the judge's last failure (its exception or a verdict's reason). The rows drawn and not yet
    sent to their jobs are in ``Scheduler.unjudged()``.
    """

    def __init__(self, failed: int, window: int, max_share: float, last_error: str) -> None:
        self.failed, self.window = failed, window
        self.max_share, self.last_error = max_share, last_error
        super().__init__(
            f"the judge failed on {failed} of the last {window} rows judged "
            f"({failed / max(window, 1):.0%} > {max_share:.0%}); last error: {last_error}"
        )


@dataclasses.dataclass(frozen=True)
class SavedRows:
    """Rows of one block drawn by an earlier run and never sent to their job (no verdicts).

    seed, alpha, rollout_start: the block's stream and first rollout index; rows: the per-row
    arrays of a store chunk (tokens int32 [n, T], lengths, logp_original, logp_variant,
    logp_sampled, truncated, nonfinite [n]).
    """

    seed: int
    alpha: float
    rollout_start: int
    rows: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Draw:
    """``n`` fresh rollouts at ``alpha`` from the random stream ``seed`` of the job's prompt."""

    alpha: float
    n: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Ahead:
    """Draws to start now and collect later with :class:`Collect`: the job resumes at once (it
    is sent None). Their rows go to the engine and the judge after every waited draw's rows."""

    draws: Sequence[Draw]


@dataclasses.dataclass(frozen=True)
class Collect:
    """Wait for every Ahead draw of the job not yet collected; the job is sent their Drawn, in
    the order they were yielded. A job must collect its Ahead draws before it returns."""


@dataclasses.dataclass(frozen=True)
class Drawn:
    """The outcome of one Draw: rows ``rollout_start .. rollout_start + n - 1`` of its stream.

    tokens int32 [n, T] (-1 after a row ends), or None when replayed from a journal; lengths
    int32 [n]; logp_original, logp_variant float32 [n] (NaN where nonfinite); logp_sampled
    float32 [n]: each row's log-probability under the distribution it was drawn from (the path at
    the draw's alpha, temperature applied; NaN where nonfinite), for path importance sampling;
    truncated, nonfinite bool [n]; verdicts int8 [n] (1 complied, 0 did not, -1 unknown) or None
    when the scheduler has no judge.
    """

    draw: Draw
    rollout_start: int
    tokens: np.ndarray | None
    lengths: np.ndarray
    logp_original: np.ndarray
    logp_variant: np.ndarray
    logp_sampled: np.ndarray
    truncated: np.ndarray
    nonfinite: np.ndarray
    verdicts: np.ndarray | None

    def result(self) -> DrawResult:
        """k, generated tokens and judged count, as the estimators' ``draw`` returns them."""
        if self.verdicts is None:
            raise ValueError("this Drawn has no verdicts: build the Scheduler with a judge")
        return DrawResult(
            k=int((self.verdicts == 1).sum()),
            generated_tokens=int(self.lengths.sum()),
            n_judged=int((self.verdicts >= 0).sum()),
        )

    @property
    def log_weights(self) -> np.ndarray:
        """float64 [n]: log p_original(x) - log p_variant(x), the importance weight's log."""
        return (self.logp_original.astype(np.float64)) - self.logp_variant.astype(np.float64)

    def chunk(self) -> dict[str, np.ndarray]:
        """The rows as a store chunk (store.CHUNK_FIELDS)."""
        if self.tokens is None:
            raise ValueError("this Drawn was replayed from a journal and has no tokens")
        return {
            "tokens": self.tokens,
            "lengths": self.lengths,
            "logp_original": self.logp_original,
            "logp_variant": self.logp_variant,
            "logp_sampled": self.logp_sampled,
            "truncated": self.truncated,
            "nonfinite": self.nonfinite,
        }


@dataclasses.dataclass(frozen=True)
class JobPrompt:
    """The prompt a job draws for. Jobs with one ``key`` share the engine's K/V prefix.

    key: hashable identity of the prompt (e.g. its id); ids: int [P] chat-templated prompt
    tokens; text: what the judge reads as the prompt.
    """

    key: Hashable
    ids: np.ndarray
    text: str


Job = Generator[Draw | Sequence[Draw] | Ahead | Collect, Any, Any]


class Engine(Protocol):
    """What the scheduler needs of lpe_jax.decoding.engine.RolloutEngine."""

    def submit(self, block: Any) -> None: ...

    def poll(self) -> list[Any]: ...

    @property
    def idle(self) -> bool: ...


def search_job(
    search: Generator[DrawRequest, Any, Any],
    seed: int,
    record: list[Drawn] | None = None,
    ahead: Callable[[int], Ahead] | None = None,
) -> Job:
    """A scheduler job from an estimator search that yields DrawRequest and receives DrawResult.

    Every request becomes a Draw on stream ``seed``; returns what the search returns. Compose
    with ``yield from`` inside a larger job. ``record``, when given, gets every Drawn appended
    in draw order (per-row verdicts and log-probs, e.g. for path importance sampling).
    ``ahead(n)``, when given, is yielded before each draw of n rows (draws that follow the
    search's budget; the caller collects them).
    """
    try:
        request = next(search)
        while True:
            if ahead is not None:
                yield ahead(int(request.n))
            drawn = yield Draw(request.alpha, request.n, seed)
            if record is not None:
                record.append(drawn)
            request = search.send(drawn.result())
    except StopIteration as stop:
        return stop.value


def judge_rows(
    judge: Judge,
    prompt_text: str,
    tokens: np.ndarray,
    lengths: np.ndarray,
    nonfinite: np.ndarray,
    decode: Callable[[Sequence[int]], str],
) -> np.ndarray:
    """Verdicts int8 [N] of N rows (tokens [N, T], lengths [N], nonfinite [N]).

    1 complied, 0 did not, -1 unknown: the judge could not decide, or the row was stopped on
    non-finite logits (never judged, never counted as a refusal).
    """
    return _judge_batch(judge, decode, [(prompt_text, tokens, lengths, nonfinite)])[0][0]


def _judge_batch(
    judge: Judge,
    decode: Callable[[Sequence[int]], str],
    parts: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[list[np.ndarray], str]:
    """One judge call over several (prompt_text, tokens, lengths, nonfinite) parts: their
    verdicts, and the reason of the last verdict the judge could not give ("" if none)."""
    out, items, where = [], [], []
    for j, (text, tokens, lengths, nonfinite) in enumerate(parts):
        out.append(np.full(len(lengths), UNKNOWN, np.int8))
        for i in np.flatnonzero(~np.asarray(nonfinite, bool)):
            items.append((text, decode(tokens[i, : lengths[i]].tolist())))
            where.append((j, i))
    verdicts = judge.judge(items) if items else []
    if len(verdicts) != len(items):
        raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(items)} items")
    reason = ""
    for (j, i), v in zip(where, verdicts, strict=True):
        if v.complied is not None:
            out[j][i] = int(v.complied)
        else:
            reason = v.reason
    return out, reason


@dataclasses.dataclass
class SchedulerStats:
    """Counters of one Scheduler.

    polls: engine.poll calls; polls_while_judging: of those, made while a judge batch was running
    (the device worked during judging); judge_batches / judged_rows: judge calls and rows sent;
    judge_errors: judge calls that raised (their rows are unknown); judge_failed_rows: rows the
    judge gave no verdict for (raised or None); reused_rows: rows of an earlier run judged
    instead of drawn (``add(rows=...)``); judge_waits: times the loop
    blocked on the judge with nothing for the engine to do; blocks / rows: submitted to the
    engine; rows_done / tokens: rows whose block the engine finished, and their generated
    tokens; max_inflight_rows: the most rows submitted and not yet judged at once.
    seconds: wall time of run(); judge_busy_s: of it, seconds with at least one judge call
    running (rows pending at the judge); judge_row_s: rows in judge calls integrated over time
    (judge_row_s / judge_busy_s = rows in the judge's hands on average while it had any).
    """

    polls: int = 0
    polls_while_judging: int = 0
    judge_batches: int = 0
    judged_rows: int = 0
    judge_errors: int = 0
    judge_failed_rows: int = 0
    reused_rows: int = 0
    judge_waits: int = 0
    blocks: int = 0
    rows: int = 0
    rows_done: int = 0
    tokens: int = 0
    max_inflight_rows: int = 0
    seconds: float = 0.0
    judge_busy_s: float = 0.0
    judge_row_s: float = 0.0


@dataclasses.dataclass
class _DrawState:
    job: _JobState
    draw: Draw
    start: int
    parts: list[dict[str, np.ndarray] | None]
    block_rows: int = 1  # rows per part (RowBlock)
    waited: bool = True  # the job waits for it (False: an Ahead draw not yet collected)
    submitted: bool = False  # its blocks were made (an Ahead draw replayed is never submitted)

    @property
    def complete(self) -> bool:
        return all(p is not None for p in self.parts)

    def drawn(self) -> Drawn:
        cat = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        return Drawn(self.draw, self.start, verdicts=cat.pop("verdicts", None), **cat)


@dataclasses.dataclass
class _JobState:
    key: Hashable
    index: int
    prompt: JobPrompt
    gen: Job
    replay: collections.deque[list[Drawn]] = dataclasses.field(default_factory=collections.deque)
    waiting: list[_DrawState] = dataclasses.field(default_factory=list)
    ahead: list[_DrawState] = dataclasses.field(default_factory=list)  # not yet collected
    single: bool = True


@dataclasses.dataclass
class _Tag:
    """RowBlock.tag: which part of which draw a block is."""

    state: _DrawState
    part: int
    ahead: bool = False  # counted in the Ahead rows in flight (set when it enters the flight)


def _as_draws(request: Any, key: Hashable) -> list[Draw]:
    """The Draws of one yield (a Draw, or a non-empty list/tuple of them), checked."""
    draws = list(request) if isinstance(request, (list, tuple)) else [request]
    if not draws:
        raise ValueError(f"job {key!r} yielded an empty list of draws")
    return [_as_draw(d, key) for d in draws]


def _as_draw(x: Any, key: Hashable) -> Draw:
    if not isinstance(x, Draw):
        raise TypeError(
            f"job {key!r} yielded a {type(x).__name__}; a job yields a Draw or a list of Draws"
        )
    if not (isinstance(x.n, (int, np.integer)) and x.n >= 1):
        raise ValueError(f"job {key!r}: Draw.n must be an integer >= 1, got {x.n!r}")
    if not math.isfinite(float(x.alpha)):
        raise ValueError(f"job {key!r}: Draw.alpha must be finite, got {x.alpha!r}")
    if not (isinstance(x.seed, (int, np.integer)) and 0 <= x.seed < 2**32):
        raise ValueError(f"job {key!r}: Draw.seed must be an integer in [0, 2**32), got {x.seed!r}")
    return x


def _stream_of(seed: int, alpha: float) -> tuple[int, int]:
    """(seed, alpha in quanta): a stream's key within its prompt."""
    return int(seed), round(float(alpha) / ALPHA_QUANTUM)


def _rows(rollouts: Any) -> dict[str, np.ndarray]:
    """A one-alpha Rollouts (A = 1) as flat per-row arrays."""
    return {
        "tokens": np.asarray(rollouts.tokens)[0],
        "lengths": np.asarray(rollouts.lengths)[0],
        "logp_original": np.asarray(rollouts.logp_original)[0],
        "logp_variant": np.asarray(rollouts.logp_variant)[0],
        "logp_sampled": np.asarray(rollouts.logp_sampled)[0],
        "truncated": np.asarray(rollouts.truncated)[0],
        "nonfinite": np.asarray(rollouts.nonfinite)[0],
    }


class Scheduler:
    """Drive jobs on one engine; see the module docstring.

    engine: submit(RowBlock) / poll() -> [BlockResult] / idle
    (lpe_jax.decoding.engine.RolloutEngine).
    judge, decode: a Judge and token ids -> response text; None for no judging (verdicts None).
    block_rows: a draw is cut into RowBlocks of at most this many rows, so judging can start
        before a large draw has fully decoded (the rows, and so the results, do not change).
    max_inflight_rows: rows submitted to the engine and not yet judged, at most (>= block_rows);
        size it to a few times the engine's slots so the device stays busy while judging.
    judge_workers: judge calls running at once (threads; more than 1 needs a judge that may be
        called from several threads at once); each worker also has its next batch queued, so it
        never waits for the loop (busy in engine.poll) between calls. judge_batch_rows: rows per
        judge call (finished blocks queued for the judge are merged up to this size). Both are
        ignored for a judge with a ``concurrency`` attribute, which gets one call per finished
        block, up to JUDGE_QUEUE x concurrency rows at once (see the module docstring).
    max_jobs: jobs running at once (None: all); later jobs start as earlier ones finish. Draws of
        earlier-added jobs go to the engine first.
    on_outcome(key, [Drawn, ...]): called when a yield of a job is complete, before the job is
        sent it (e.g. Journal.append, so a killed run can replay it).
    judge_grace: after handing rows to the judge, wait up to this fraction of the last
        engine.poll's duration for verdicts before polling again (the engine has a call in
        flight meanwhile); 0 never waits.
    max_judge_failure_share: stop (JudgeFailedError) when the judge fails on more than this
        share of the last ``judge_failure_window`` rows it judged (module docstring); None never
        stops and delivers every row at once.
    ahead_engine_rows: Ahead draws' blocks go to the engine only while it holds fewer
        unfinished rows than this, with theirs (default: ``engine.slots``, else
        ``max_inflight_rows``): the device stays full, and a waited block queues behind few rows.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        judge: Judge | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        block_rows: int = 64,
        max_inflight_rows: int = 1024,
        judge_workers: int = 1,
        judge_batch_rows: int = 256,
        max_jobs: int | None = None,
        on_outcome: Callable[[Hashable, list[Drawn]], None] | None = None,
        judge_grace: float = 0.5,
        max_judge_failure_share: float | None = None,
        judge_failure_window: int = 200,
        ahead_engine_rows: int | None = None,
    ) -> None:
        if (judge is None) != (decode is None):
            raise ValueError("pass judge and decode together (or neither, for no judging)")
        for name, v in (
            ("block_rows", block_rows),
            ("judge_workers", judge_workers),
            ("judge_batch_rows", judge_batch_rows),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_inflight_rows < block_rows:
            raise ValueError(
                f"max_inflight_rows ({max_inflight_rows}) must be >= block_rows ({block_rows}), "
                "or no block could ever be submitted"
            )
        if not 0 <= judge_grace <= 1:
            raise ValueError(f"judge_grace must be in [0, 1], got {judge_grace}")
        if max_jobs is not None and max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1 or None, got {max_jobs}")
        if max_judge_failure_share is not None and not 0 <= max_judge_failure_share < 1:
            raise ValueError(
                f"max_judge_failure_share must be in [0, 1) or None, got {max_judge_failure_share}"
            )
        if judge_failure_window < 1:
            raise ValueError(f"judge_failure_window must be >= 1, got {judge_failure_window}")
        if ahead_engine_rows is None:
            ahead_engine_rows = int(getattr(engine, "slots", max_inflight_rows))
        if ahead_engine_rows < 1:
            raise ValueError(f"ahead_engine_rows must be >= 1 or None, got {ahead_engine_rows}")
        self.ahead_engine_rows = int(ahead_engine_rows)
        self.engine = engine
        self.judge, self.decode = judge, decode
        self.block_rows, self.max_inflight_rows = int(block_rows), int(max_inflight_rows)
        self.judge_workers, self.judge_batch_rows = int(judge_workers), int(judge_batch_rows)
        self.max_jobs, self.on_outcome = max_jobs, on_outcome
        self.judge_grace, self._poll_s = float(judge_grace), 0.0
        self.judge_width = _concurrency(judge)
        self.stats = SchedulerStats()
        self._queued: collections.deque[tuple[Hashable, JobPrompt, Job, list]] = collections.deque()
        self._keys: set[Hashable] = set()
        self._active: dict[Hashable, _JobState] = {}
        self._order = itertools.count()
        self._offsets: dict[tuple[Hashable, int, int], int] = {}
        self._owners: dict[tuple[Hashable, int, int], Hashable] = {}
        # Heap of (0 waited / 1 Ahead, job index, seq, RowBlock): waited draws' blocks first.
        self._pending: list[tuple[int, int, int, Any]] = []
        self._seq = itertools.count()
        self._inflight = 0
        self._to_judge: collections.deque[tuple[_Tag, dict[str, np.ndarray]]] = collections.deque()
        self._to_judge_ahead: collections.deque[tuple[_Tag, dict[str, np.ndarray]]] = (
            collections.deque()
        )
        self._engine_rows = 0  # rows submitted to the engine and not yet finished by it
        self._ahead_inflight = 0  # of self._inflight, rows of Ahead draws (_Tag.ahead)
        self._judging: dict[cf.Future, list[tuple[_Tag, dict[str, np.ndarray]]]] = {}
        self._done: collections.deque[tuple[Hashable, Any]] = collections.deque()
        self._meter = _BusyMeter()
        self._judge_rows = 0  # rows in judge calls not yet collected
        self.max_judge_failure_share = max_judge_failure_share
        self._window: collections.deque[bool] = collections.deque(maxlen=judge_failure_window)
        self._held: list[tuple[_Tag, dict[str, np.ndarray]]] = []
        self._last_judge_error = ""
        self._saved: dict[tuple[Hashable, int, int, int, int], SavedRows] = {}
        self._unjudged: dict[Hashable, list[SavedRows]] | None = None

    def add(
        self,
        key: Hashable,
        prompt: JobPrompt,
        job: Job,
        replay: Sequence[Sequence[Drawn]] = (),
        rows: Sequence[SavedRows] = (),
    ) -> None:
        """Queue a job under a unique key; it starts when run() reaches it.

        replay: outcomes of the job's first yields recorded by an earlier run (Journal.load): they
        are sent back without drawing, after checking that the job asks for exactly those draws
        (ValueError otherwise: the run's settings changed); its later draws continue the streams.
        rows: blocks an earlier run drew and never sent to the job (``unjudged()``): a block the
        job asks for again (same stream, start and size) is judged from them, not drawn.
        """
        if key in self._keys:
            raise ValueError(f"a job with key {key!r} was already added")
        for r in rows:
            n = len(r.rows["lengths"])
            self._saved[(key, *_stream_of(r.seed, r.alpha), int(r.rollout_start), n)] = r
        self._keys.add(key)
        self._queued.append((key, prompt, job, [list(r) for r in replay]))

    @property
    def busy(self) -> bool:
        """Jobs queued or running, or rows anywhere between the engine and the judge."""
        return bool(self._queued or self._active or self._inflight)

    def run(self, stop: Callable[[], bool] | None = None) -> Iterator[tuple[Hashable, Any]]:
        """Run every added job; yields (key, return value) as each job finishes.

        Jobs may be added while iterating. A job that raises stops the run (RuntimeError naming
        the job); judge threads are shut down on exit, also when the caller stops iterating.
        stop: checked once per loop turn; when it returns True the run ends at once, leaving
        unfinished jobs where they are (e.g. a time limit).
        """
        # A wide judge's calls are single blocks of >= 1 row, at most JUDGE_QUEUE x width rows.
        wide = self.judge_width is not None
        threads = JUDGE_QUEUE * self.judge_width if wide else self.judge_workers
        pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="lpe-judge")
        t0 = time.perf_counter()
        try:
            while (self.busy or self._done) and not (stop is not None and stop()):
                self._admit()
                self._submit()
                if not self.engine.idle:
                    self._poll()
                self._dispatch_judging(pool)
                self._collect_judged(wait=self.engine.idle and not self._done)
                self._dispatch_judging(pool)  # refill the queue slot a finished call freed
                while self._done:
                    yield self._done.popleft()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.stats.seconds += time.perf_counter() - t0
            self.stats.judge_busy_s, self.stats.judge_row_s = self._meter.read()

    # -- jobs --------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self._queued and (self.max_jobs is None or len(self._active) < self.max_jobs):
            key, prompt, gen, replay = self._queued.popleft()
            state = _JobState(key, next(self._order), prompt, gen, collections.deque(replay))
            self._active[key] = state
            self._advance(state, None)

    def _advance(self, job: _JobState, value: Any) -> None:
        """Send `value` to the job; register its next draws (or replay them), or record its
        result."""
        while True:
            try:
                request = job.gen.send(value)
            except StopIteration as stop:
                if job.ahead:
                    raise RuntimeError(
                        f"job {job.key!r} returned with {len(job.ahead)} Ahead draws it never "
                        "collected; yield Collect() before returning"
                    ) from None
                del self._active[job.key]
                self._done.append((job.key, stop.value))
                return
            except Exception as e:
                raise RuntimeError(f"job {job.key!r} raised {type(e).__name__}: {e}") from e
            if not job.replay:  # the journal's yields are all replayed: draw what they deferred
                for state in job.ahead:
                    self._make_blocks(state)
            if isinstance(request, Ahead):
                draws = _as_draws(list(request.draws), job.key)
                states = [self._allocate(job, d, waited=False) for d in draws]
                job.ahead += states
                if not job.replay:
                    for state in states:
                        self._make_blocks(state)
                value = None
                continue
            if isinstance(request, Collect):
                value = self._collect(job)
                if value is None:
                    return
                continue
            job.single = isinstance(request, Draw)
            draws = _as_draws(request, job.key)
            if not job.replay:
                job.waiting = [self._allocate(job, d) for d in draws]
                for state in job.waiting:
                    self._make_blocks(state)
                return
            recorded = self._replayed(job, draws, job.replay.popleft())
            value = recorded[0] if job.single else recorded

    def _collect(self, job: _JobState) -> list[Drawn] | None:
        """A Collect: the Ahead draws' outcomes if they are known now (replayed, or all judged
        already), else None (the job waits for them)."""
        states, job.ahead = job.ahead, []
        if not states:
            raise ValueError(f"job {job.key!r} yielded Collect() with no Ahead draws to collect")
        job.single = False
        if job.replay:
            recorded = job.replay.popleft()
            return self._check_replay(job, [(s.draw, s.start) for s in states], recorded)
        for state in states:
            state.waited = True
        self._promote(states)
        job.waiting = states
        if not all(s.complete for s in states):
            return None
        drawn = [s.drawn() for s in states]
        if self.on_outcome is not None:
            self.on_outcome(job.key, drawn)
        return drawn

    def _promote(self, states: list[_DrawState]) -> None:
        """Collected Ahead draws are waited for now: their queued blocks and rows go first."""
        ids = {id(s) for s in states}
        self._pending = [(0 if id(e[3].tag.state) in ids else e[0], *e[1:]) for e in self._pending]
        heapq.heapify(self._pending)
        moved = [x for x in self._to_judge_ahead if id(x[0].state) in ids]
        self._to_judge_ahead = collections.deque(
            x for x in self._to_judge_ahead if id(x[0].state) not in ids
        )
        self._to_judge.extend(moved)

    def _replayed(self, job: _JobState, draws: list[Draw], recorded: list[Drawn]) -> list[Drawn]:
        """Check a recorded yield against the job's request and advance the streams past it."""
        starts = [self._allocate(job, d).start for d in draws]
        return self._check_replay(job, list(zip(draws, starts, strict=True)), recorded)

    def _check_replay(
        self, job: _JobState, asked: list[tuple[Draw, int]], recorded: list[Drawn]
    ) -> list[Drawn]:
        """`recorded` if it holds the (draw, rollout start) pairs the job asks for now."""
        got = [(d.draw, d.rollout_start) for d in recorded]
        if got != asked:
            raise ValueError(
                f"the recorded draws of job {job.key!r} ({got}) are not what it asks for now "
                f"({asked}): the journal comes from a run with other settings (or another "
                "lpe_jax); delete it or rerun with those settings"
            )
        return recorded

    def _allocate(self, job: _JobState, draw: Draw, waited: bool = True) -> _DrawState:
        """The draw's state, at the next rollout index of its stream; advances the stream."""
        stream = (job.prompt.key, *_stream_of(draw.seed, draw.alpha))
        owner = self._owners.setdefault(stream, job.key)
        if owner != job.key:
            raise ValueError(
                f"job {job.key!r} draws from stream (prompt {job.prompt.key!r}, seed {draw.seed}, "
                f"alpha {draw.alpha}) that job {owner!r} draws from; give each job its own seed"
            )
        start = self._offsets.get(stream, 0)
        self._offsets[stream] = start + int(draw.n)
        # Ahead draws in smaller blocks: a block counts as in the engine until its last row
        # ends, so small ones let Ahead rows fill the slots more closely (AHEAD_BLOCK_DIV).
        rows = self.block_rows if waited else max(1, self.block_rows // AHEAD_BLOCK_DIV)
        n_parts = -(-int(draw.n) // rows)
        return _DrawState(job, draw, start, [None] * n_parts, rows, waited=waited)

    def _make_blocks(self, state: _DrawState) -> None:
        """Queue the draw's blocks for the engine (waited draws' first), or for the judge where
        an earlier run drew them; once."""
        if state.submitted:
            return
        state.submitted = True
        job, draw, start = state.job, state.draw, state.start
        stream = _stream_of(draw.seed, draw.alpha)
        for part in range(len(state.parts)):
            lo = part * state.block_rows
            block = RowBlock(
                prompt_key=job.prompt.key,
                prompt_ids=job.prompt.ids,
                alpha=float(draw.alpha),
                seed=int(draw.seed),
                rollout_start=start + lo,
                count=min(state.block_rows, int(draw.n) - lo),
                tag=_Tag(state, part),
            )
            saved = self._saved.pop((job.key, *stream, start + lo, block.count), None)
            if saved is None:
                priority = 0 if state.waited else 1
                heapq.heappush(self._pending, (priority, job.index, next(self._seq), block))
            else:  # drawn by an earlier run: judge it, do not draw it again
                block.tag.ahead = not state.waited
                self._inflight += block.count
                self._ahead_inflight += block.count if block.tag.ahead else 0
                self.stats.reused_rows += block.count
                self._queue_judge(block.tag, saved.rows)

    def _deliver(self, tag: _Tag, rows: dict[str, np.ndarray]) -> None:
        """One block's rows are final (judged if there is a judge)."""
        self._inflight -= len(rows["lengths"])
        self._ahead_inflight -= len(rows["lengths"]) if tag.ahead else 0
        tag.state.parts[tag.part] = rows
        job = tag.state.job
        if not tag.state.waited or not all(s.complete for s in job.waiting):
            return
        drawn = [s.drawn() for s in job.waiting]
        if self.on_outcome is not None:
            self.on_outcome(job.key, drawn)
        self._advance(job, drawn[0] if job.single else drawn)

    # -- engine ------------------------------------------------------------------------------

    def _submit(self) -> None:
        while self._pending:
            block = self._pending[0][-1]
            if self._inflight + block.count > self.max_inflight_rows:
                return
            block.tag.ahead = not block.tag.state.waited  # a collected draw's are waited now
            if block.tag.ahead and not self._room_ahead(block.count):
                return  # the heap puts waited blocks first: none is left
            heapq.heappop(self._pending)
            self.engine.submit(block)
            self._inflight += block.count
            self._engine_rows += block.count
            self._ahead_inflight += block.count if block.tag.ahead else 0
            self.stats.blocks += 1
            self.stats.rows += block.count
            self.stats.max_inflight_rows = max(self.stats.max_inflight_rows, self._inflight)

    def _room_ahead(self, n: int) -> bool:
        """Whether n rows of an Ahead draw may go to the engine now: the engine has room for
        them in its slots (so a waited block submitted next queues behind few rows) and Ahead
        rows keep within their share of the rows in flight (AHEAD_INFLIGHT)."""
        if self._engine_rows == 0:
            return True
        fits = self._engine_rows + n <= self.ahead_engine_rows
        return fits and self._ahead_inflight + n <= AHEAD_INFLIGHT * self.max_inflight_rows

    def _poll(self) -> None:
        self.stats.polls += 1
        self.stats.polls_while_judging += any(not f.done() for f in self._judging)
        t0 = time.perf_counter()
        results = self.engine.poll()
        self._poll_s = time.perf_counter() - t0
        for result in results:
            self._finished(result)

    def _finished(self, result: Any) -> None:
        tag = result.block.tag
        rows = _rows(result.rollouts)
        if len(rows["lengths"]) != result.block.count:
            raise RuntimeError(
                f"engine returned {len(rows['lengths'])} rows for a block of {result.block.count}"
            )
        self.stats.rows_done += len(rows["lengths"])
        self._engine_rows -= len(rows["lengths"])
        self.stats.tokens += int(rows["lengths"].sum())
        if self._unjudged is not None:  # stopping: keep it for the rerun
            self._held.append((tag, rows))
        elif self.judge is None:
            self._deliver(tag, rows)
        else:
            self._queue_judge(tag, rows)

    # -- judge -------------------------------------------------------------------------------

    def _queue_judge(self, tag: _Tag, rows: dict[str, np.ndarray]) -> None:
        """A finished block waits for the judge: waited draws' blocks before Ahead ones."""
        (self._to_judge if tag.state.waited else self._to_judge_ahead).append((tag, rows))

    def _dispatch_judging(self, pool: cf.ThreadPoolExecutor) -> None:
        if self.judge_width is not None:
            # Every finished block goes out at once, so the judge starts a row the moment one
            # ends, whatever the loop does (see JUDGE_QUEUE); Ahead rows while the judge has
            # little queued (AHEAD_JUDGE), so waited rows find a short queue.
            width = self.judge_width
            while self._to_judge and self._judge_rows < JUDGE_QUEUE * width:
                self._send(pool, [self._to_judge.popleft()])
            while self._to_judge_ahead and self._judge_rows < JUDGE_QUEUE * width:
                level = self._meter.level()
                if level and level + self._rows_of_ahead() > AHEAD_JUDGE * width:
                    break
                self._send(pool, [self._to_judge_ahead.popleft()])
            return
        # Each worker gets a second batch queued behind its current one: a worker that finishes
        # while the loop is inside engine.poll starts on it at once instead of idling until the
        # loop hands it more (with a judge as slow as the decode that idling cost ~20% of it).
        # A batch takes waited draws' blocks first, then Ahead ones.
        while self._next_to_judge() and len(self._judging) < 2 * self.judge_workers:
            batch, n = [], 0
            while (queue := self._next_to_judge()) and (
                not batch or n + len(queue[0][1]["lengths"]) <= self.judge_batch_rows
            ):
                tag, rows = queue.popleft()
                batch.append((tag, rows))
                n += len(rows["lengths"])
            self._send(pool, batch)

    def _next_to_judge(self) -> collections.deque:
        """The queue the judge's next block comes from (empty when neither has one)."""
        return self._to_judge or self._to_judge_ahead

    def _send(self, pool: cf.ThreadPoolExecutor, batch: list) -> None:
        """One judge call over the blocks of `batch` ([(tag, rows)]) on a pool thread."""
        parts = [
            (t.state.job.prompt.text, r["tokens"], r["lengths"], r["nonfinite"]) for t, r in batch
        ]
        n = sum(len(r["lengths"]) for _, r in batch)
        self._judging[pool.submit(self._judge_safely, parts, n)] = batch
        self._judge_rows += n
        self.stats.judge_batches += 1
        self.stats.judged_rows += n

    def _rows_of_ahead(self) -> int:
        return len(self._to_judge_ahead[0][1]["lengths"])

    def _judge_safely(self, parts: list[tuple[str, Any, Any, Any]], n: int) -> tuple[list, str]:
        self._meter.add(n)
        try:
            return _judge_batch(self.judge, self.decode, parts)
        except Exception as e:  # a failed judge call leaves its rows unknown, never refused
            log.warning(
                "judge call failed (%s: %s); its rows are unknown (-1)", type(e).__name__, e
            )
            self.stats.judge_errors += 1
            return [np.full(len(p[2]), UNKNOWN, np.int8) for p in parts], f"{type(e).__name__}: {e}"
        finally:
            self._meter.add(-n)

    def _collect_judged(self, wait: bool) -> None:
        if not self._judging:
            self._release_held()
            if wait and self.busy and not self._pending and not self._done:
                raise RuntimeError("scheduler stalled: jobs wait but nothing is in flight (a bug)")
            return
        if wait:
            self.stats.judge_waits += 1
            cf.wait(self._judging, return_when=cf.FIRST_COMPLETED)
        elif self.judge_grace > 0:
            # The engine keeps a call running meanwhile, so this wait costs the device nothing
            # while it is shorter than that call; verdicts of a fast judge then reach the next
            # call instead of the one after it.
            cf.wait(
                self._judging,
                timeout=self.judge_grace * self._poll_s,
                return_when="FIRST_COMPLETED",
            )
        for future in [f for f in self._judging if f.done()]:
            batch = self._judging.pop(future)
            self._judge_rows -= sum(len(rows["lengths"]) for _, rows in batch)
            verdicts, reason = future.result()
            self._last_judge_error = reason or self._last_judge_error
            for (tag, rows), v in zip(batch, verdicts, strict=True):
                self._judged(tag, {**rows, "verdicts": v})
        self._release_held()

    # -- the judge watch ---------------------------------------------------------------------

    def _judged(self, tag: _Tag, rows: dict[str, np.ndarray]) -> None:
        """Deliver judged rows, or hold them while the judge's failures are in question."""
        failed = (rows["verdicts"] < 0) & ~np.asarray(rows["nonfinite"], bool)
        self.stats.judge_failed_rows += int(failed.sum())
        if self.max_judge_failure_share is None:
            self._deliver(tag, rows)
            return
        self._window.extend(failed.tolist())
        if failed.any():
            self._held.append((tag, rows))
        else:
            self._deliver(tag, rows)

    def _release_held(self) -> None:
        """Decide on the held rows: stop once the judge failed on more than the share of a full
        window (before it fills: more than share x window rows, so a judge that is down from
        the start stops at once and one early failure does not); deliver them (their unknown
        verdicts final) once the window is full or nothing else can come back."""
        if not self._held or self._unjudged is not None:
            return
        failed = sum(self._window)
        if failed > self.max_judge_failure_share * self._window.maxlen:
            share, seen = self.max_judge_failure_share, len(self._window)
            self._stop(JudgeFailedError(failed, seen, share, self._last_judge_error))
        full = len(self._window) == self._window.maxlen
        if full or (not self._judging and not self._next_to_judge() and self.engine.idle):
            held, self._held = self._held, []
            for tag, rows in held:
                self._deliver(tag, rows)

    def _stop(self, error: JudgeFailedError) -> None:
        """Finish every row already drawn (judging nothing more), keep the rows no job was sent
        for ``unjudged()``, and raise ``error``."""
        self._unjudged = {}
        self._pending.clear()
        for future in list(self._judging):
            future.cancel()
            batch = self._judging.pop(future)
            self._judge_rows -= sum(len(rows["lengths"]) for _, rows in batch)
            self._held += batch
        self._held += [*self._to_judge, *self._to_judge_ahead]
        self._to_judge.clear()
        self._to_judge_ahead.clear()
        while not self.engine.idle:
            self._poll()  # _finished adds the rows to _held
        blocks = [(t, r) for t, r in self._held]
        for job in self._active.values():
            for state in [*job.waiting, *job.ahead]:
                blocks += [(_Tag(state, i), p) for i, p in enumerate(state.parts) if p is not None]
        for tag, rows in blocks:
            st = tag.state
            rows = {k: v for k, v in rows.items() if k != "verdicts"}
            saved = SavedRows(
                st.draw.seed, st.draw.alpha, st.start + tag.part * st.block_rows, rows
            )
            self._unjudged.setdefault(st.job.key, []).append(saved)
        for (key, *_), saved in self._saved.items():  # passed back, not yet asked for
            self._unjudged.setdefault(key, []).append(saved)
        self._held = []
        raise error

    def unjudged(self) -> dict[Hashable, list[SavedRows]]:
        """After a JudgeFailedError: per job key, the blocks drawn and never sent to the job
        (pass them to ``add(rows=...)`` on the rerun); {} otherwise."""
        return dict(self._unjudged or {})


def _concurrency(judge: Judge | None) -> int | None:
    """The judge's ``concurrency`` (items it works on at once over concurrent calls), or None."""
    width = getattr(judge, "concurrency", None)
    if width is None:
        return None
    if not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"judge.concurrency must be an integer >= 1 or absent, got {width!r}")
    return int(width)


class _BusyMeter:
    """Rows inside judge calls over time, from the judge threads: seconds with any, and the
    integral of their number (row-seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._level, self._since = 0, time.perf_counter()
        self._busy_s = self._row_s = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._level:
                self._busy_s += now - self._since
                self._row_s += self._level * (now - self._since)
            self._level, self._since = self._level + n, now

    def level(self) -> int:
        """Rows inside judge calls now."""
        with self._lock:
            return self._level

    def read(self) -> tuple[float, float]:
        """(busy seconds, row-seconds) so far."""
        self.add(0)
        with self._lock:
            return self._busy_s, self._row_s


def judge_utilisation(stats: SchedulerStats, judge: Judge) -> str:
    """One log line: how full the judge was and its share of the wall time.

    For a judge with ``concurrency`` that times its requests (RubricJudge): requests in flight on
    average while it had at least `concurrency` requests to make (how well it is driven), and
    while it had any rows (below its concurrency when the device does not make rows fast enough);
    for others, rows in judge calls on average. "busy" is the share of run()'s wall time with
    rows at the judge: near 1 with a full judge means scale the judge (more concurrency, or
    another endpoint); a judge that is rarely busy waits for the device.
    """
    busy = stats.judge_busy_s
    share = busy / stats.seconds if stats.seconds > 0 else 0.0
    width = getattr(judge, "concurrency", None)
    js = judge.stats
    request_s = float(getattr(js, "request_s", 0.0))
    if width is not None and request_s > 0 and busy > 0:
        backlog_s = float(getattr(js, "backlog_s", 0.0))
        use = f"{request_s / busy:.1f} of {width} requests in flight on average while any rows were"
        if backlog_s > 0:
            full = js.backlog_request_s / backlog_s
            use += f", {full:.1f} while >= {width} were wanted ({backlog_s:.1f} s)"
    else:
        use = f"{stats.judge_row_s / busy if busy else 0.0:.1f} rows in judge calls on average"
    return (
        f"judge: {use}; busy {busy:.1f} s of {stats.seconds:.1f} s wall ({share:.0%}), "
        f"{stats.judge_batches} calls"
    )
