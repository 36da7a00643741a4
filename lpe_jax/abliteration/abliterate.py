"""Find a refusal direction in the residual stream of a Qwen3 or Qwen3.5 (dense or MoE) model
(Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

Every pass below runs the model's own layer loop (`Qwen3.forward`, `Qwen35.forward`: the same
hook sites) with a residual-stream hook, so it reads and edits a hybrid Qwen3.5's stream exactly
as a Qwen3's: a Gated DeltaNet layer's write is its "attn" site, like gated attention's.

- **Post-instruction positions** are the chat-template tokens after the user's text: for Qwen3
  with thinking off, `<|im_end|> \\n <|im_start|> assistant \\n <think> \\n\\n </think> \\n\\n`
  (9 tokens). They are found by rendering the template around a sentinel message and taking what
  follows it (`post_instruction_ids`), so any chat template works. Qwen3's empty think block
  counts: every prompt this project samples (thinking off) ends with it, and the last prompt
  position, whose next-token distribution holds the refusal decision and the refusal score, lies
  after it. With thinking on the template writes no block and the suffix has 5 tokens.
- **Activations**: `resid_pre` of every decoder layer l (its input; l = 0 is the embedding
  output), at each post-instruction position, averaged over prompts in float64
  (`mean_activations`). Prompts are right-padded into batches: attention is causal, so padding
  never changes the positions read.
- **Candidates** r[p, l] = mean_harmful - mean_harmless, unit-normalized (`candidate_directions`).
  At layer 0 both sets see the same template tokens, so the difference is zero there: such
  candidates are marked invalid, never normalized into noise.
- **Selection** (`select_direction`), as in the paper's code: ablate the candidate at run time
  (projected out of the residual stream after the embedding and after every attention and MLP
  write) and read, at the last prompt position, (a) the mean refusal score on held-out harmful
  prompts, (b) the mean KL(original || ablated) on harmless prompts; (c) add the unnormalized
  difference at the candidate's own layer on harmless prompts and read the refusal score there.
  Keep candidates from the first (1 - prune_layer_fraction) of the layers with KL <= kl_threshold
  and (c) >= induce_threshold; choose the lowest (a). The paper's values: 0.2, 0.1, 0.0.
- **Refusal score**: log p(refusal) - log(1 - p(refusal)) at the last prompt position, where
  p(refusal) is the next-token mass on the refusal-opening tokens (the paper uses "I" and "As" for
  Qwen). Computed exactly in float64 by log-sum-exp over both sets of tokens (the paper adds 1e-8
  inside the logs instead).

The weights are edited by `lpe_jax.abliteration.orthogonalize`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import log_softmax, logsumexp

from lpe_jax.model.qwen3 import DecoderLayer, Hook, Qwen3
from lpe_jax.model.qwen35 import DecoderLayer as HybridLayer
from lpe_jax.model.qwen35 import Qwen35
from lpe_jax.model.tokenizer import chat_prompt_ids

Array = jax.Array
Model = Qwen3 | Qwen35
Progress = Callable[[int], None]
"""Called with the number of prompts just processed (for progress bars with an ETA)."""

_SENTINEL = "\u2063lpe-sentinel-7f3a\u2063"  # never tokenized: only located in rendered text


# ----------------------------------------------------------------------------------------------
# post-instruction positions


def post_instruction_ids(tokenizer: Any, *, enable_thinking: bool = False) -> list[int]:
    """Token ids the chat template writes after the user's text, generation prompt included.

    Renders one user turn holding a sentinel and encodes what follows the sentinel. Raises
    ValueError when the tokenizer has no chat template, or the template does not copy the user's
    text verbatim (then positions after it are not defined).
    """
    prefix, suffix = _template_parts(tokenizer, enable_thinking)
    ids = [int(i) for i in tokenizer.encode(suffix, add_special_tokens=False)]
    if not ids:
        raise ValueError("the chat template writes nothing after the user's text.")
    return ids


def _template_parts(tokenizer: Any, enable_thinking: bool) -> tuple[str, str]:
    chat_prompt_ids(tokenizer, "x", enable_thinking=enable_thinking)  # validates the template
    kwargs = {"enable_thinking": enable_thinking} if _has_thinking(tokenizer) else {}
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}],
        tokenize=False,
        add_generation_prompt=True,
        **kwargs,
    )
    if text.count(_SENTINEL) != 1:
        raise ValueError(
            "the chat template does not copy the user's message verbatim once, so the "
            "post-instruction positions are not defined; use a template that renders the content."
        )
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


def _has_thinking(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    return "enable_thinking" in template


def encode_instructions(
    tokenizer: Any, texts: Sequence[str], *, enable_thinking: bool = False
) -> tuple[list[np.ndarray], list[int]]:
    """Chat-templated ids of each text (int32 [T_i]) and the post-instruction ids they all end
    with. Raises ValueError naming the first text whose ids do not end with them (the tokenizer
    merged the user's last characters into the template's tokens)."""
    suffix = post_instruction_ids(tokenizer, enable_thinking=enable_thinking)
    out = []
    for text in texts:
        ids = chat_prompt_ids(tokenizer, text, enable_thinking=enable_thinking)
        if len(ids) <= len(suffix) or ids[-len(suffix) :] != suffix:
            raise ValueError(
                f"the tokens of prompt {text[:60]!r} do not end with the template's "
                f"post-instruction tokens {suffix}; strip trailing whitespace from the prompt."
            )
        out.append(np.asarray(ids, np.int32))
    return out, suffix


def refusal_token_ids(tokenizer: Any, openings: Sequence[str]) -> list[int]:
    """Sorted ids of the first token of each refusal opening (e.g. "I", "As")."""
    if not openings:
        raise ValueError("refusal openings are empty; pass at least one, e.g. ['I', 'As'].")
    ids = set()
    for text in openings:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if not text or not encoded:
            raise ValueError(f"refusal opening {text!r} encodes to no token; pass a word.")
        ids.add(int(encoded[0]))
    return sorted(ids)


# ----------------------------------------------------------------------------------------------
# forward pass with run-time interventions


def project_out(x: Array, unit: Array, strength: Array | float = 1.0) -> Array:
    """x [..., H] minus `strength` times its component along `unit` ([H], float32), computed in
    float32, returned in x's dtype. strength broadcasts against x[..., :1] (e.g. [B, 1, 1])."""
    xf = x.astype(jnp.float32)
    return (xf - strength * (xf @ unit)[..., None] * unit).astype(x.dtype)


def ablation_hook(
    ablate: Array | None = None,
    add_layer: int | None = None,
    add_vector: Array | None = None,
    record: list[Array] | None = None,
) -> Hook:
    """The residual-stream hook (`lpe_jax.model.qwen3.Hook`) of run-time ablation and activation
    addition: `ablate` (unit [H]) is projected out of the embedding and every attention and MLP
    write; `add_vector` [H] is added to the input of layer `add_layer`; `record` (a list, filled
    while the pass is traced) receives every layer's input after the addition."""

    def hook(layer: int, site: str, x: Array) -> Array:
        if site != "input":
            return x if ablate is None else project_out(x, ablate)
        if add_vector is not None and layer == add_layer:
            x = x + jnp.asarray(add_vector).astype(x.dtype)
        if record is not None:
            record.append(x)
        return x

    return hook


def decoder_block(
    layer: DecoderLayer | HybridLayer, x: Array, ablate: Array | None = None
) -> Array:
    """One decoder layer on the residual stream x [B, T, H] (positions 0..T-1), in x's dtype.

    ablate: unit direction [H] projected out of the attention and the MLP write.
    """
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return layer(x, positions, hook=ablation_hook(ablate))[0]


def residual_forward(
    model: Model,
    tokens: Array,
    *,
    ablate: Array | None = None,
    add_layer: int | None = None,
    add_vector: Array | None = None,
) -> tuple[Array, list[Array]]:
    """Causal pass over tokens int [B, T]: (hidden [B, T, H] before the final norm, the input of
    every decoder layer, L arrays [B, T, H]), in the param dtype. Traceable as one program.

    ablate: unit direction [H] projected out after the embedding and after every attention and
        MLP write (a zero vector changes nothing). add_layer/add_vector: add the vector [H] to
        the input of that layer. The model's own loop with `ablation_hook`; without
        interventions, the model's plain pass (tested). `model.logits(hidden)` gives logits.
    """
    resid: list[Array] = []
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hook = ablation_hook(ablate, add_layer, add_vector, resid)
    x, _ = model.forward(tokens, positions, None, hook)
    return x, resid


# One jitted layer at a time, driven from the host. XLA's CPU backend computes bf16 dots in
# float32 and, in a single program over all layers, converts every layer's weights up front: a
# 0.6B model's pass held 1.8 GB beyond its 1.2 GB of weights. Stepping keeps one layer's
# converted weights alive, and compiles one layer instead of all of them. It is the model loop
# (`Qwen3.forward`, `Qwen35.forward`) driven from the host: the embedding site, then each
# layer's own body with `ablation_hook`; the addition and the reading of each layer's input (the
# "input" site) happen between the steps. A Qwen3.5 layer run alone is a full causal pass (its
# Gated DeltaNet starts from the zero state), as inside the loop.


@jax.jit
def _embed_step(table: Array, tokens: Array, ablate: Array) -> Array:
    return ablation_hook(ablate)(0, "embed", table[tokens])


@functools.partial(jax.jit, static_argnums=0)
def _block_step(graphdef: nnx.GraphDef, state: nnx.State, x: Array, ablate: Array) -> Array:
    return decoder_block(nnx.merge(graphdef, state), x, ablate)


@functools.partial(jax.jit, static_argnums=0)
def _head_step(graphdef: nnx.GraphDef, state: nnx.State, x: Array, last: Array) -> Array:
    """float32 logits [B, V] of hidden x [B, T, H] at positions last int [B]."""
    return nnx.merge(graphdef, state).logits(jnp.take_along_axis(x, last[:, None, None], 1)[:, 0])


def _stepped(
    model: Model,
    tokens: np.ndarray,
    ablate: np.ndarray,
    add: tuple[int, np.ndarray] | None,
    index: np.ndarray | None = None,
) -> tuple[Array, list[np.ndarray]]:
    """residual_forward layer by layer: (hidden [B, T, H], each layer's input at index int
    [B, P] as float32 [B, P, H] when index is given)."""
    x = _embed_step(model.embed_tokens[...], tokens, ablate)
    picked = []
    for i, layer in enumerate(model.layers):
        if add is not None and i == add[0]:
            x = x + jnp.asarray(add[1]).astype(x.dtype)
        if index is not None:
            picked.append(np.take_along_axis(np.asarray(x, np.float32), index[:, :, None], axis=1))
        x = _block_step(*nnx.split(layer), x, ablate)
    return x, picked


def _batches(
    prompts: Sequence[np.ndarray], batch_size: int
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(tokens int32 [B, Tb] right-padded, lengths int32 [B], real rows) per batch.

    Every batch has the same row count (padding rows repeat the first prompt and are dropped),
    and Tb is a length bucket, so few shapes are compiled.
    """
    from lpe_jax.decoding.sampler import prompt_bucket

    if not prompts:
        raise ValueError("no prompts given; pass at least one.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    rows = min(batch_size, 1 << max(0, len(prompts) - 1).bit_length())
    out = []
    for start in range(0, len(prompts), rows):
        chunk = list(prompts[start : start + rows])
        real = len(chunk)
        chunk += [chunk[0]] * (rows - real)
        tokens = np.zeros((rows, prompt_bucket(max(len(p) for p in chunk))), np.int32)
        for i, p in enumerate(chunk):
            tokens[i, : len(p)] = p
        out.append((tokens, np.asarray([len(p) for p in chunk], np.int32), real))
    return out


def mean_activations(
    model: Model,
    prompts: Sequence[np.ndarray],
    n_post: int,
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> np.ndarray:
    """float64 [n_post, L, H]: each layer's input at the last n_post positions of each prompt
    (int arrays [T_i], T_i > n_post), averaged over prompts. Position p counts from the end:
    index 0 is the n_post-th last token."""
    if any(len(p) <= n_post for p in prompts):
        raise ValueError(f"every prompt needs more than n_post={n_post} tokens.")
    zero = np.zeros(model.cfg.hidden_size, np.float32)
    total = np.zeros((n_post, model.cfg.num_layers, model.cfg.hidden_size), np.float64)
    for tokens, lengths, real in _batches(prompts, batch_size):
        index = lengths[:, None] - n_post + np.arange(n_post, dtype=np.int32)
        _, picked = _stepped(model, tokens, zero, None, index)
        acts = np.stack(picked, axis=1)[:real]  # [B, L, P, H]
        total += acts.astype(np.float64).sum(axis=0).transpose(1, 0, 2)
        if progress is not None:
            progress(real)
    return total / len(prompts)


def last_token_logits(
    model: Model,
    prompts: Sequence[np.ndarray],
    *,
    ablate: np.ndarray | None = None,
    add: tuple[int, np.ndarray] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> np.ndarray:
    """float32 [N, V]: next-token logits after each prompt's last token.

    ablate: unit direction [H] projected out of the residual stream at run time; add: (layer,
    vector [H]) added to that layer's input at every position (the paper's activation addition).
    """
    h = model.cfg.hidden_size
    unit = np.zeros(h, np.float32) if ablate is None else _check_vector(ablate, h, "ablate")
    if add is not None:
        check_candidate(add[0], None, model.cfg.num_layers, 1)
        add = (add[0], _check_vector(add[1], h, "add vector"))
    graphdef, state = nnx.split(model)
    out = []
    for tokens, lengths, real in _batches(prompts, batch_size):
        x, _ = _stepped(model, tokens, unit, add)
        logits = _head_step(graphdef, state, x, lengths - 1)
        out.append(np.asarray(logits)[:real])
        if progress is not None:
            progress(real)
    return np.concatenate(out)


def _check_vector(v: np.ndarray, size: int, what: str) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if v.shape != (size,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be a finite float vector [{size}]; got shape {v.shape}.")
    return v


# ----------------------------------------------------------------------------------------------
# scores


def refusal_scores(logits: np.ndarray, refusal_ids: Sequence[int]) -> np.ndarray:
    """float64 [N]: log p(refusal) - log(1 - p(refusal)) per row of logits [N, V], where
    p(refusal) is the softmax mass on refusal_ids (exact in float64, no epsilon)."""
    lp = log_softmax(np.asarray(logits, np.float64), axis=-1)
    mask = np.zeros(lp.shape[-1], bool)
    mask[list(refusal_ids)] = True
    return logsumexp(lp[:, mask], axis=-1) - logsumexp(lp[:, ~mask], axis=-1)


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
    """float64 [N]: KL(softmax p || softmax q) in nats, per row of logits [N, V]."""
    lp = log_softmax(np.asarray(logits_p, np.float64), axis=-1)
    lq = log_softmax(np.asarray(logits_q, np.float64), axis=-1)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


# ----------------------------------------------------------------------------------------------
# candidates and selection


def check_candidate(layer: int | None, position: int | None, num_layers: int, n_post: int) -> None:
    """ValueError unless layer lies in [0, num_layers) and position in [-n_post, -1] (either may
    be None: not given)."""
    if layer is not None and not 0 <= layer < num_layers:
        raise ValueError(
            f"layer {layer} is out of range: the model has {num_layers} layers "
            f"(0..{num_layers - 1})."
        )
    if position is not None and not -n_post <= position <= -1:
        raise ValueError(
            f"position {position} is out of range: the template has {n_post} post-instruction "
            f"tokens, so positions run from -{n_post} to -1."
        )


def candidate_directions(
    mean_harmful: np.ndarray, mean_harmless: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From means [P, L, H]: (raw differences float32 [P, L, H], unit directions float32
    [P, L, H], valid bool [P, L]). A candidate is invalid when its difference is below 1e-6 of
    the activations' size (e.g. layer 0: the same template tokens in both sets); its unit
    direction is zero."""
    diff = np.asarray(mean_harmful, np.float64) - np.asarray(mean_harmless, np.float64)
    norm = np.linalg.norm(diff, axis=-1)
    size = np.linalg.norm(mean_harmful, axis=-1) + np.linalg.norm(mean_harmless, axis=-1)
    valid = np.isfinite(norm) & (norm > 1e-6 * size)
    unit = np.where(valid[..., None], diff / np.where(valid, norm, 1.0)[..., None], 0.0)
    return diff.astype(np.float32), unit.astype(np.float32), valid


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """The paper's filters. kl_threshold / induce_threshold None switch that filter off; the
    last prune_layer_fraction of the layers (layer >= int(L * (1 - fraction))) are skipped."""

    kl_threshold: float | None = 0.1
    induce_threshold: float | None = 0.0
    prune_layer_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise ValueError(
                f"prune_layer_fraction must lie in [0, 1); got {self.prune_layer_fraction}."
            )
        if self.kl_threshold is not None and not self.kl_threshold > 0:
            raise ValueError(f"kl_threshold must be > 0 or None; got {self.kl_threshold}.")

    def kept_layers(self, num_layers: int) -> int:
        """Candidates come from layers 0 .. kept_layers - 1."""
        return int(num_layers * (1.0 - self.prune_layer_fraction))


@dataclasses.dataclass(frozen=True)
class CandidateScores:
    """One candidate's effect, means over prompts. refusal: refusal score on harmful prompts with
    the direction ablated; kl: KL(original || ablated) on harmless prompts at the last position;
    induce: refusal score on harmless prompts with the raw difference added at the candidate's
    layer (None when not measured)."""

    refusal: float
    kl: float
    induce: float | None


def score_candidate(
    model: Model,
    unit: np.ndarray,
    harmful: Sequence[np.ndarray],
    harmless: Sequence[np.ndarray],
    harmless_logits: np.ndarray,
    refusal_ids: Sequence[int],
    *,
    add: tuple[int, np.ndarray] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> CandidateScores:
    """Scores of the unit direction [H]; harmless_logits [N, V] are the original's last-position
    logits on `harmless` (for the KL). `add` = (layer, raw difference) also measures induce."""
    kw = dict(batch_size=batch_size, progress=progress)
    ablated = last_token_logits(model, harmful, ablate=unit, **kw)
    refusal = float(refusal_scores(ablated, refusal_ids).mean())
    kl = float(
        kl_divergence(harmless_logits, last_token_logits(model, harmless, ablate=unit, **kw)).mean()
    )
    induce = None
    if add is not None:
        steered = last_token_logits(model, harmless, add=add, **kw)
        induce = float(refusal_scores(steered, refusal_ids).mean())
    return CandidateScores(refusal, kl, induce)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen candidate and every candidate's scores ([P, L] float64, NaN where not scored:
    invalid or pruned). position counts from the end of the prompt: -P .. -1."""

    layer: int
    position: int
    direction: np.ndarray
    refusal: np.ndarray
    kl: np.ndarray
    induce: np.ndarray
    eligible: np.ndarray
    baseline_harmful: float
    baseline_harmless: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the choice, the baselines and the score grids (null where not scored)."""

        def grid(a: np.ndarray) -> list[list[float | None]]:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        p = self.refusal.shape[0]
        return {
            "layer": self.layer,
            "position": self.position,
            "refusal_score_ablated": float(self.refusal[self.position + p, self.layer]),
            "kl": float(self.kl[self.position + p, self.layer]),
            "baseline_refusal_harmful": self.baseline_harmful,
            "baseline_refusal_harmless": self.baseline_harmless,
            "grid_positions": list(range(-p, 0)),
            "grid_refusal": grid(self.refusal),
            "grid_kl": grid(self.kl),
            "grid_induce": grid(self.induce),
            "grid_eligible": self.eligible.tolist(),
        }


def select_direction(
    model: Model,
    mean_harmful: np.ndarray,
    mean_harmless: np.ndarray,
    harmful: Sequence[np.ndarray],
    harmless: Sequence[np.ndarray],
    refusal_ids: Sequence[int],
    settings: SelectionSettings = SelectionSettings(),
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> Selection:
    """Score every valid candidate of the kept layers on held-out `harmful` / `harmless` prompts
    (ids ending with the post-instruction tokens) and choose as the paper does (module doc).

    Raises ValueError when no candidate passes the filters, with how many each filter removed
    and which setting relaxes it.
    """
    raw, unit, valid = candidate_directions(mean_harmful, mean_harmless)
    p_n, l_n, _ = unit.shape
    kw = dict(batch_size=batch_size, progress=progress)
    base_harmful = refusal_scores(last_token_logits(model, harmful, **kw), refusal_ids).mean()
    harmless_logits = last_token_logits(model, harmless, **kw)
    base_harmless = refusal_scores(harmless_logits, refusal_ids).mean()
    grids = {k: np.full((p_n, l_n), np.nan) for k in ("refusal", "kl", "induce")}
    induce = settings.induce_threshold is not None
    for p in range(p_n):
        for layer in range(settings.kept_layers(l_n)):
            if not valid[p, layer]:
                continue
            add = (layer, raw[p, layer]) if induce else None
            s = score_candidate(
                model, unit[p, layer], harmful, harmless, harmless_logits, refusal_ids,
                add=add, **kw,
            )  # fmt: skip
            grids["refusal"][p, layer], grids["kl"][p, layer] = s.refusal, s.kl
            grids["induce"][p, layer] = np.nan if s.induce is None else s.induce
    eligible = _eligible(grids, settings, valid)
    if not eligible.any():
        raise ValueError(_no_candidate_message(grids, settings, valid))
    masked = np.where(eligible, grids["refusal"], np.inf)
    p, layer = np.unravel_index(int(np.argmin(masked)), masked.shape)
    return Selection(
        layer=int(layer),
        position=int(p) - p_n,
        direction=unit[p, layer],
        refusal=grids["refusal"],
        kl=grids["kl"],
        induce=grids["induce"],
        eligible=eligible,
        baseline_harmful=float(base_harmful),
        baseline_harmless=float(base_harmless),
    )


def _eligible(grids: dict[str, np.ndarray], s: SelectionSettings, valid: np.ndarray) -> np.ndarray:
    ok = valid & np.isfinite(grids["refusal"]) & np.isfinite(grids["kl"])
    if s.kl_threshold is not None:
        ok &= grids["kl"] <= s.kl_threshold
    if s.induce_threshold is not None:
        ok &= np.nan_to_num(grids["induce"], nan=-np.inf) >= s.induce_threshold
    return ok


def _no_candidate_message(
    grids: dict[str, np.ndarray], s: SelectionSettings, valid: np.ndarray
) -> str:
    scored = np.isfinite(grids["refusal"])
    n_layers = valid.shape[1]
    msg = (
        f"no candidate direction passes the filters: {int(valid.sum())} of {valid.size} "
        f"candidates are nonzero; {int(scored.sum())} were scored (layers < "
        f"{s.kept_layers(n_layers)} of {n_layers}: prune_layer_fraction={s.prune_layer_fraction})"
    )
    if s.kl_threshold is not None:
        msg += (
            f"; {int((scored & (grids['kl'] > s.kl_threshold)).sum())} have KL > {s.kl_threshold}"
        )
    if s.induce_threshold is not None:
        low = scored & ~(np.nan_to_num(grids["induce"], nan=-np.inf) >= s.induce_threshold)
        msg += f"; {int(low.sum())} do not induce refusal (score < {s.induce_threshold})"
    return msg + (
        ". Relax prune_layer_fraction (e.g. 0 on a model of a few layers), kl_threshold or "
        "induce_threshold (None switches a filter off), or pass a direction."
    )
