"""An LLM agent playing a batch of TextWorld games in lockstep (scored by `evaluation`).

Each game's prompt history lives in a KV cache (`generation.DecodeState`); every step only the
new pieces (the previous action and the new observation) are prefilled, then the per-step tail is
sampled from (generate mode) or every valid action is scored against it (score mode: new pieces,
tail and candidates in one call, for the games still in play only).

Generate mode rule for invalid text: an output that is not one of the valid actions is still sent
to the game (which answers that it does not understand: a wasted step) and counted as invalid.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from jaxrl_llm import text
from jaxrl_llm.envs.textworld import (ACTION_SUFFIX, OBSERVATION_BLOCK, Episode, TextWorldBatch,
                                      check_style, prompt_pieces, step_tail)
from jaxrl_llm.generation import DecodeState, extend, generate_from, score_continuations
from jaxrl_llm.padding import GROUP_ROWS, pad_candidates, pad_right
from jaxrl_llm.sampling import SamplingConfig
from jaxrl_llm.scoring import action_logprobs

MODES = ("generate", "score")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Attributes:
      mode: "generate" (free text, as notebook 000) or "score" (the action-level policy
        `scoring.action_logprobs` over the valid actions: always valid).
      greedy: argmax action (evaluation) or sample (collection), in both modes.
      temperature: sampling temperature (generate mode) and the action softmax's (score mode).
      length_norm: score mode: per-token mean instead of summed action log-probs.
      prompt_style: "notebook" (the per-step tail lists the valid actions), "compact" (it
        does not: a scoring policy is handed the candidates directly), "inventory"
        (compact, with what the player carries), "recipe" (inventory, with the cookbook read),
        "checklist" (the recipe's ingredients not carried and directions not done) or
        "locate" (checklist, with the room where each missing item was last seen).
      max_action_tokens: generate mode: tokens sampled per action at most.
      max_history: None keeps the whole history and prefills only new text each step; k keeps
        the last k steps (shorter prompts, but the prompt is rebuilt and re-prefilled each step).
      cache_len: KV-cache slots per game; must hold a whole episode's prompt.
    """

    mode: str = "score"
    greedy: bool = True
    temperature: float = 1.0
    length_norm: bool = False
    prompt_style: str = "notebook"
    max_action_tokens: int = 12
    max_history: int | None = None
    cache_len: int = 4096

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"AgentConfig.mode must be one of {MODES}, got {self.mode!r}")
        check_style(self.prompt_style)
        if not self.temperature > 0:
            raise ValueError(f"AgentConfig.temperature must be > 0, got {self.temperature}")
        if self.max_action_tokens < 1 or self.cache_len < 64:
            raise ValueError("AgentConfig.max_action_tokens must be >= 1 and cache_len >= 64")
        if self.max_history is not None and self.max_history < 0:
            raise ValueError(f"AgentConfig.max_history must be >= 0 or None, got "
                             f"{self.max_history}")


@dataclasses.dataclass
class Transition:
    """One game step as the learner sees it.

    `context_ids` are the ids prefilled before this step's tail: the new history chunk (whole
    history kept: the chunks of a game concatenate to its history) or the whole windowed
    prompt (`max_history=k`). `candidate_ids` are the actions the policy chose among (score
    mode: every valid action, " a" + EOS) or the sampled action (generate mode); `logprob` is
    log pi(candidate_ids[choice] | s) under the distribution it was drawn from (score mode: the
    softmax over candidates; generate mode: the summed token log-prob), and
    `candidate_logprobs` is log pi of every candidate (the update may keep only the likeliest:
    `train.ppo.top_candidates`).
    """

    game: int
    step: int
    action: str
    valid: bool
    logprob: float = 0.0
    value: float = 0.0  # V(s) from the value head, if one was given to `play`
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    next_value: float = 0.0  # V(s') of the state a truncated episode was cut at (bootstrap)
    choice: int = 0
    context_ids: list[int] = dataclasses.field(default_factory=list)
    tail_ids: list[int] = dataclasses.field(default_factory=list)
    candidate_ids: list[list[int]] = dataclasses.field(default_factory=list)
    candidate_logprobs: list[float] = dataclasses.field(default_factory=list)


# What evaluation records leave out: what only the learner reads.
LEARNER_FIELDS = ("context_ids", "tail_ids", "candidate_ids", "candidate_logprobs")


def play(model, tokenizer, games: TextWorldBatch, seeds, fold: str, key: jax.Array,
         config: AgentConfig, on_step: Callable[[list[Episode]], None] | None = None,
         value_head=None, mesh=None) -> tuple[list[Episode], list[Transition]]:
    """Play one episode in each game; returns the episodes and every transition in step order.

    With a `value_head`, each transition also records V(s) read from the sampler's hidden state
    of the last prompt token (no extra forward pass), and the last transition of a truncated
    episode V(s') of the state it was cut at (one more scoring pass for those games). With a
    `mesh`, the games' KV caches are split over its data-parallel axes (`jaxrl_llm.sharding`).
    """
    episodes = games.reset(seeds, fold)
    stop = (tokenizer.eos_token_id, text.encode(tokenizer, "\n")[-1])
    sampling = SamplingConfig(config.max_action_tokens, temperature=config.temperature,
                              greedy=config.greedy, eos_ids=stop, pad_id=tokenizer.eos_token_id)
    transitions: list[Transition] = []
    last: dict[int, Transition] = {}  # each game's latest transition
    valued: set[int] = set()  # truncated games whose last state has been valued
    state = None
    # Each game's history ids not yet in the cache. Score mode prefills them in the same call
    # that scores the step's candidates; generate mode extends the cache with them first.
    pending: list[list[int]] = []
    # A CPU prefills one row of a few hundred tokens as fast per token as a batch of such rows,
    # so there each game's new text is prefilled at its own width instead of the longest game's;
    # accelerators need the batch (`extend` still keeps one group unless groups save a quarter
    # of the padded area).
    group_rows = 1 if jax.default_backend() == "cpu" else GROUP_ROWS
    # A truncated game is scored once more, without acting, for the value of its last state.
    bootstrap = lambda g: (value_head is not None and episodes[g].truncated and g in last
                           and g not in valued)
    while any(rows := [not e.done or bootstrap(g) for g, e in enumerate(episodes)]):
        if state is None or config.max_history is not None:
            pending = [text.encode_pieces(tokenizer, prompt_pieces(e, config.max_history))
                       if row else [] for e, row in zip(episodes, rows)]
            state = None  # the old cache is freed before the new one is made, not after
            state = DecodeState.empty(model.config, len(episodes), config.cache_len, mesh)
        active = [not e.done for e in episodes]
        tail_text = [step_tail(e, config.prompt_style) for e in episodes]
        tails = [text.encode_tail(tokenizer, t) if row else [tokenizer.eos_token_id]
                 for t, row in zip(tail_text, rows)]
        key, step_key = jax.random.split(key)
        if config.mode == "generate":
            if any(pending):  # rows with nothing new (finished games) are all padding: no-ops
                state = extend(model, state, *pad_right(pending), group_rows=group_rows)
            # Finished games still occupy their row: they get a one-token tail and are ignored.
            out, state = generate_from(model, state, *pad_right(tails), step_key, sampling)
            out = jax.tree.map(np.asarray, out)
            actions = text.decode_actions(tokenizer, out.tokens, out.lengths)
            candidates = [[row[:n].tolist()] for row, n in zip(out.tokens, out.lengths)]
            choices, logprobs, hidden = [0] * len(actions), out.logprobs.sum(1), out.prompt_hidden
            logpis = [[float(x)] for x in logprobs]
        else:
            if empty := [e.seed for e, row in zip(episodes, rows) if row and not e.valid_actions]:
                raise ValueError(f"games of seeds {empty} offer no valid action: score mode "
                                 "chooses among them (use mode='generate')")
            # Only the rows still in play are computed (all of them on a sharded cache, whose
            # batch must stay whole: finished rows score a placeholder, never used).
            scored = ([g for g, row in enumerate(rows) if row]
                      if len(state.lengths.sharding.device_set) == 1 else range(len(rows)))
            options = [e.valid_actions if row else ["look"] for e, row in zip(episodes, rows)]
            candidates = [[text.encode_action(tokenizer, t, a) for a in opts]
                          for t, opts in zip(tail_text, options)]
            choices, logpis, hidden, state = _choose_by_score(
                model, state, scored, [pending[g] for g in scored],
                [tails[g] for g in scored], [candidates[g] for g in scored], step_key, config)
            actions = [opts[c] for opts, c in zip(options, choices)]
            logprobs = [pi[c] if pi else 0.0 for pi, c in zip(logpis, choices)]
        values = (np.asarray(value_head(hidden)).tolist() if value_head is not None
                  else [0.0] * len(episodes))
        for game, e in enumerate(episodes):
            if active[game]:
                last[game] = Transition(
                    game, e.num_steps, actions[game], actions[game] in e.valid_actions,
                    logprob=float(logprobs[game]), value=values[game], choice=int(choices[game]),
                    context_ids=pending[game], tail_ids=tails[game],
                    candidate_ids=candidates[game], candidate_logprobs=logpis[game])
                transitions.append(last[game])
            elif rows[game]:
                last[game].next_value = values[game]
                valued.add(game)
        episodes = games.step([a if act else None for a, act in zip(actions, active)])
        pending = []
        for game, is_active in enumerate(active):
            e = episodes[game]
            if is_active:
                t = last[game]
                t.reward, t.terminated, t.truncated = e.rewards[-1], e.terminated, e.truncated
            # A truncated game's last state is still read, for its value.
            keep = is_active and (not e.done or bootstrap(game))
            pieces = ([ACTION_SUFFIX.format(actions[game]),
                       OBSERVATION_BLOCK.format(e.num_steps, e.observations[-1])] if keep else [])
            pending.append(text.encode_pieces(tokenizer, pieces))
        if on_step:
            on_step(episodes)
    return episodes, transitions


def _choose_by_score(model, state, rows, pending, tails, encoded, key, config: AgentConfig):
    """Prefill each scored row's pending history with its tail and score every candidate
    against it, in one call; pick by the action-level policy.

    Returns `(choices [B], log pi of each row's candidates (lists, empty on the rows not
    scored), prompt_hidden [B, D] (zeros on the rows not scored), state)`.
    """
    candidates, mask = pad_candidates(encoded)
    prefix = [p + t for p, t in zip(pending, tails)]
    (scores, hidden), state = score_continuations(
        model, state, *pad_right(prefix), candidates, mask, keep=[len(p) for p in pending],
        rows=rows)
    logpi = np.asarray(action_logprobs(scores, mask.any(-1), config.temperature,
                                       mask.sum(-1) if config.length_norm else None))
    if config.greedy:
        choice = logpi.argmax(-1)
    else:
        choice = np.asarray(jax.random.categorical(key, logpi, axis=-1))
    batch, rows, hidden = state.lengths.shape[0], np.asarray(rows, np.int64), np.asarray(hidden)
    choices, logpis = np.zeros(batch, np.int64), [[] for _ in range(batch)]
    states = np.zeros((batch, hidden.shape[1]), hidden.dtype)
    choices[rows], states[rows] = choice, hidden
    for row, pi, n in zip(rows, logpi, (len(c) for c in encoded)):
        logpis[row] = pi[:n].tolist()
    return choices, logpis, states, state


BASELINES = ("random", "gold")


def play_baseline(games: TextWorldBatch, seeds, fold: str, policy: str,
                  rng: np.random.Generator,
                  on_step: Callable[[list[Episode]], None] | None = None
                  ) -> tuple[list[Episode], list[Transition]]:
    """Reference policies without a model: a uniformly random valid action, or the expert's
    gold path (cut by the step limit like any policy). Transitions carry only action validity."""
    if policy not in BASELINES:
        raise ValueError(f"baseline policy must be one of {BASELINES}, got {policy!r}")
    episodes = games.reset(seeds, fold, gold=policy == "gold")
    gold = [games.gold_actions(i) for i in range(games.num_games)] if policy == "gold" else None
    transitions: list[Transition] = []
    while not all(e.done for e in episodes):
        actions = []
        for game, e in enumerate(episodes):
            if e.done:
                actions.append(None)
                continue
            action = (gold[game][e.num_steps] if gold and e.num_steps < len(gold[game])
                      else str(rng.choice(e.valid_actions)))
            transitions.append(Transition(game, e.num_steps, action, action in e.valid_actions))
            actions.append(action)
        episodes = games.step(actions)
        if on_step:
            on_step(episodes)
    return episodes, transitions
