"""TextWorld Express games on the CPU side, stepped in lockstep, and notebook 000's prompts.

Step limit: `step_limit = N` means an episode has **at most N actions**. We enforce it ourselves
(the engine's `envStepLimit=N` allows N + 1 actions and keeps accepting steps after `done`). An
episode ends either *terminated* (the task succeeded or failed: no future value) or *truncated*
(the N-th action was taken without termination: bootstrap from the value of the state reached).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

logger = logging.getLogger(__name__)
# py4j logs each refused connection to a dead engine with a full traceback; a crash is reported
# here in one line instead, and the engine restarted.
logging.getLogger("py4j").setLevel(logging.CRITICAL)

GAMES = ("cookingworld",)
FOLDS = ("train", "dev", "test")
INSTRUCTION = "# TASK: {}\nChoose exactly one valid action."
OBSERVATION_BLOCK = "\n# STEP {} \nObs: {}"
ACTION_SUFFIX = "\nAction: {}"
TAIL = "\nValid actions: {}\nAction: "
# "notebook": notebook 000's tail lists the valid actions (a generator needs them); "compact"
# asks for the action only: a scoring policy is handed the candidates directly, and the list is
# most of a game's tokens. "inventory" is compact with what the player carries: the tail is
# never part of the history, so the state costs its tokens once per step, not once per later
# step, and the policy need not recount its pickups from the whole history. "recipe" adds the
# cookbook the player has read: what is left to do becomes a comparison of two adjacent lines,
# not a lookup of a block read tens of steps back. "checklist" does that comparison for the
# policy: the recipe's ingredients not carried and its directions not yet done, read from the
# cookbook and the inventory the player has seen (`checklist`). "locate" adds where the player
# last saw each missing item (`last_seen`): an item in view many steps back is otherwise a
# lookup across the whole history, and a policy that misses it shuttles between rooms.
PROMPT_STYLES = ("notebook", "compact", "inventory", "recipe", "checklist", "locate")
COMPACT_TAIL = "\nAction: "
INVENTORY_TAIL = "\nInventory: {}\nAction: "
RECIPE_TAIL = "\nRecipe: {}\nInventory: {}\nAction: "
UNREAD_RECIPE = "not read yet"
CHECKLIST_TAIL = "\nMissing: {}\nTo do: {}\nAction: "
UNREAD_TAIL = "\nRecipe: {}\nAction: "
# The word the inventory shows on an ingredient once a direction's verb was applied to it
# ("a sliced fried block of cheese").
PARTICIPLES = dict(slice="sliced", dice="diced", chop="chopped", fry="fried", roast="roasted",
                   grill="grilled")
ROOM = re.compile(r"You are in the ([^.]+)\.")
CUTS = ("slice", "dice", "chop")  # the directions the game only allows with a knife carried


@dataclasses.dataclass(frozen=True)
class GameConfig:
    """A TextWorld Express game family (defaults: notebook 000's cookingworld).

    Attributes:
      game_name: one of `GAMES`.
      num_locations, include_doors, num_distractor_items, num_ingredients: generator params.
      step_limit: at most this many actions per episode (16 in the notebook, 32 = "full").
    """

    game_name: str = "cookingworld"
    num_locations: int = 3
    include_doors: int = 1
    num_distractor_items: int = 2
    num_ingredients: int = 2
    step_limit: int = 16

    def __post_init__(self):
        if self.game_name not in GAMES:
            raise ValueError(f"unknown game {self.game_name!r}; supported: {', '.join(GAMES)}")
        if self.step_limit < 1:
            raise ValueError(f"step_limit must be >= 1, got {self.step_limit}")
        if not 1 <= self.num_locations <= 11:
            raise ValueError(f"num_locations must be in [1, 11], got {self.num_locations}")
        if self.include_doors not in (0, 1):
            raise ValueError(f"include_doors must be 0 or 1, got {self.include_doors}")
        if not 0 <= self.num_distractor_items <= 10:
            raise ValueError("num_distractor_items must be in [0, 10], got "
                             f"{self.num_distractor_items}")
        if not 1 <= self.num_ingredients <= 5:
            raise ValueError(f"num_ingredients must be in [1, 5], got {self.num_ingredients}")

    def params_string(self) -> str:
        # Built from validated fields only: the engine silently ignores names it does not know.
        return (f"numLocations={self.num_locations},includeDoors={self.include_doors},"
                f"numDistractorItems={self.num_distractor_items},"
                f"numIngredients={self.num_ingredients}")


@dataclasses.dataclass
class Episode:
    """One game's trajectory so far; `observations` has one more entry than `actions`."""

    seed: int
    fold: str
    task: str
    observations: list[str]
    actions: list[str] = dataclasses.field(default_factory=list)
    valid_actions: list[str] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    scores: list[float] = dataclasses.field(default_factory=list)  # score after each step
    inventory: str | None = None  # what the player carries now (`inventory_text`)
    success: bool = False
    failure: bool = False
    truncated: bool = False

    @property
    def terminated(self) -> bool:
        return self.success or self.failure

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def num_steps(self) -> int:
        return len(self.actions)

    @property
    def score(self) -> float:
        return self.scores[-1] if self.scores else 0.0

    def cut(self, step_limit: int) -> Episode:
        """This episode as it would have ended under a lower `step_limit`.

        Exact for any policy that never sees the limit (ours: prompts do not mention it), so one
        play at the largest limit gives the results at every smaller one. `valid_actions` of a
        cut episode is empty: valid actions are not kept per step.
        """
        if step_limit < 1:
            raise ValueError(f"step_limit must be >= 1, got {step_limit}")
        if self.num_steps <= step_limit:
            return self
        return dataclasses.replace(
            self, observations=self.observations[:step_limit + 1],
            actions=self.actions[:step_limit], valid_actions=[],
            rewards=self.rewards[:step_limit], scores=self.scores[:step_limit],
            success=False, failure=False, truncated=True)


def _check_fold(fold: str) -> None:
    if fold not in FOLDS:
        raise ValueError(f"unknown fold {fold!r}; choose from {', '.join(FOLDS)}")


def _make_env(config: GameConfig):
    from textworld_express import TextWorldExpressEnv

    # The engine's own limit is set beyond ours so that it never ends an episode first.
    env = TextWorldExpressEnv(envStepLimit=config.step_limit + 8)
    env.load(config.game_name, config.params_string())
    return env


def _close_env(env) -> None:
    """Close an engine and wait for its JVM to exit.

    The engine's `__del__` closes it again and writes to the JVM's stdin while the process is
    alive: waiting here makes that second close a no-op instead of a BrokenPipeError on stderr.
    """
    env.close()
    process = env._gateway.java_process
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class TextWorldBatch:
    """N games stepped in lockstep, one engine (JVM) per game.

    `reset(seeds, fold)` starts one episode per game; `step(actions)` advances the games that are
    not done (their entry in `actions` is ignored once done). A game whose engine raises is
    restarted and its episode replayed from the seed and action history; if that fails too, the
    episode is marked truncated with a warning so a run never hangs or silently loses it.

    Each engine is its own process, so `workers` threads can talk to several at once (the
    Python side only waits on sockets). On 2 cores that pays only for many games (128 games:
    ~1.4x env-steps/s with 16 threads; 8 games: none), see `benchmarks/games.py`.
    """

    def __init__(self, config: GameConfig, num_games: int, workers: int = 1):
        for name, value in (("num_games", num_games), ("workers", workers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.config = config
        self._pool = ThreadPoolExecutor(min(workers, num_games))
        self._envs = list(self._pool.map(lambda _: _make_env(config), range(num_games)))
        self.episodes: list[Episode] = []

    @property
    def num_games(self) -> int:
        return len(self._envs)

    def reset(self, seeds: Sequence[int], fold: str, gold: bool = False) -> list[Episode]:
        """Start one episode per game; `gold=True` also generates the expert paths."""
        _check_fold(fold)
        if len(seeds) != self.num_games:
            raise ValueError(f"got {len(seeds)} seeds for {self.num_games} games")
        self.episodes = list(self._pool.map(lambda i: self._reset_one(i, int(seeds[i]), fold, gold),
                                            range(self.num_games)))
        return self.episodes

    def gold_actions(self, index: int) -> list[str]:
        """The expert action sequence of game `index` (after `reset(..., gold=True)`)."""
        return list(self._envs[index].getGoldActionSequence())

    def _reset_one(self, index: int, seed: int, fold: str, gold: bool = False) -> Episode:
        try:
            obs, info = self._envs[index].reset(seed=seed, gameFold=fold, generateGoldPath=gold)
        except Exception as error:  # a dead engine: start a new one (a second failure raises)
            logger.warning("game %d crashed before seed %d (%r); restarting its engine", index,
                           seed, error)
            self._restart(index)
            obs, info = self._envs[index].reset(seed=seed, gameFold=fold, generateGoldPath=gold)
        return Episode(seed=seed, fold=fold, task=info["taskDescription"], observations=[obs],
                       valid_actions=list(info["validActions"]),
                       inventory=inventory_text(info["inventory"]))

    def step(self, actions: Sequence[str | None]) -> list[Episode]:
        if len(actions) != self.num_games:
            raise ValueError(f"got {len(actions)} actions for {self.num_games} games")
        list(self._pool.map(self._step_one, range(self.num_games), actions))
        return self.episodes

    def _step_one(self, index: int, action: str | None) -> None:
        episode = self.episodes[index]
        if episode.done:
            return
        try:
            obs, reward, _, info = self._envs[index].step(action)
        except Exception as error:  # a crashed JVM: replay once, else cut the episode
            obs, reward, info = self._recover(index, episode, action, error)
            if info is None:
                return
        self._record(episode, action, obs, reward, info)

    def _record(self, episode: Episode, action: str, obs: str, reward: float, info) -> None:
        episode.actions.append(action)
        episode.observations.append(obs)
        episode.rewards.append(float(reward))
        episode.scores.append(float(info["score"]))
        episode.valid_actions = list(info["validActions"])
        episode.inventory = inventory_text(info["inventory"])
        episode.success, episode.failure = bool(info["tasksuccess"]), bool(info["taskfailure"])
        episode.truncated = not episode.terminated and episode.num_steps >= self.config.step_limit

    def _recover(self, index: int, episode: Episode, action: str, error: Exception):
        logger.warning("game %d (seed %d) crashed (%r); restarting its engine and replaying",
                       index, episode.seed, error)
        try:
            self._restart(index)
            self._envs[index].reset(seed=episode.seed, gameFold=episode.fold)
            for past in episode.actions:
                self._envs[index].step(past)
            obs, reward, _, info = self._envs[index].step(action)
            return obs, reward, info
        except Exception as second:
            logger.warning("game %d could not be replayed (%r): episode cut as truncated",
                           index, second)
            episode.truncated = True
            return None, 0.0, None

    def _restart(self, index: int) -> None:
        try:
            _close_env(self._envs[index])
        except Exception:  # the engine is already gone: nothing left to close
            pass
        self._envs[index] = _make_env(self.config)

    def close(self) -> None:
        for env in self._envs:
            _close_env(env)
        self._envs = []
        self._pool.shutdown()

    def __enter__(self) -> "TextWorldBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ prompts (notebook 000)

def prompt_pieces(episode: Episode, max_history: int | None = None) -> list[str]:
    """The prompt prefix as pieces: instruction, then per past step its observation block and
    its action suffix, then the current observation block.

    Pieces are the unit of tokenization (`text.encode_pieces`): a multi-turn generator extends
    its cache with the new pieces of each step, and SFT data is tokenized from the same pieces,
    so both see identical token ids.

    With `max_history=k`, only the last k past steps are kept; the `# TASK:` instruction is
    always kept (notebook 000 drops it at step == max_history, a bug). With `max_history=None`
    the pieces only grow: step t+1 appends the action suffix of step t and a new block.
    """
    if max_history is not None and max_history < 0:
        raise ValueError(f"max_history must be >= 0 or None, got {max_history}")
    steps = range(episode.num_steps)
    if max_history is not None:
        steps = steps[max(0, len(steps) - max_history):]
    pieces = [INSTRUCTION.format(episode.task)]
    for i in steps:
        pieces += [OBSERVATION_BLOCK.format(i, episode.observations[i]),
                   ACTION_SUFFIX.format(episode.actions[i])]
    return pieces + [OBSERVATION_BLOCK.format(episode.num_steps, episode.observations[-1])]


def check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def _items(lines: Sequence[str]) -> list[str]:
    """The items of an engine's indented list (`["  a cookbook", "  a knife", ""]`):
    `["a cookbook", "a knife"]`."""
    return [line.strip() for line in lines if line.strip()]


def inventory_text(engine_text: str) -> str:
    """The engine's inventory on one line, without its header: `"a cookbook, a knife"`."""
    return ", ".join(_items(engine_text.splitlines()[1:]))


def _is_cookbook(observation: str) -> bool:
    """Whether `observation` is the text of a cookbook read (its ingredients and directions)."""
    return "Ingredients:" in observation and "Directions:" in observation


def read_recipe(observations: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """The last cookbook read in `observations` as (ingredients, directions), or None."""
    for observation in reversed(observations):
        if _is_cookbook(observation):
            ingredients, directions = observation.split("Ingredients:", 1)[1].split(
                "Directions:", 1)
            return _items(ingredients.splitlines()), _items(directions.splitlines())
    return None


def recipe_text(observations: Sequence[str]) -> str:
    """The last cookbook read in `observations` on one line, `"block of cheese, red apple; slice
    the block of cheese, prepare meal"` (ingredients; directions), or `UNREAD_RECIPE`."""
    recipe = read_recipe(observations)
    if recipe is None:
        return UNREAD_RECIPE
    return "; ".join(", ".join(part) for part in recipe)


def checklist(observations: Sequence[str], inventory: str) -> tuple[list[str], list[str]] | None:
    """What the last cookbook read in `observations` still asks of a player carrying
    `inventory` (`inventory_text`): (ingredients not carried, directions not done), or None
    before the cookbook is read. A direction is done when the carried ingredient shows its
    verb's participle ("fry the carrot": "a fried carrot"), and every one of them once a meal
    is carried (preparing it uses the ingredients up). A knife is missing while a cut is left
    to do and none is carried."""
    recipe = read_recipe(observations)
    if recipe is None:
        return None
    carried = inventory.split(", ")
    if "a meal" in carried:
        return [], []

    def held(name: str) -> str | None:
        return next((item for item in carried if item == name or item.endswith(f" {name}")),
                    None)

    def done(direction: str) -> bool:
        verb, _, name = direction.partition(" the ")
        item = held(name)
        return verb in PARTICIPLES and item is not None and PARTICIPLES[verb] in item.split()

    ingredients, directions = recipe
    todo = [direction for direction in directions if not done(direction)]
    missing = [name for name in ingredients if held(name) is None]
    if held("knife") is None and any(d.split(" ", 1)[0] in CUTS for d in todo):
        missing.append("knife")
    return missing, todo


def current_room(observations: Sequence[str]) -> str | None:
    """The room of the last room description in `observations` ("You are in the pantry. ..."):
    where the player is, since only moving changes it and every move describes the new room."""
    for observation in reversed(observations):
        if match := ROOM.match(observation):
            return match.group(1)
    return None


def last_seen(observations: Sequence[str], names: Sequence[str]) -> list[str | None]:
    """For each item of `names`, the room where the last observation naming it was made (a
    room description, an opened container's contents, a dropped item), or None if none did;
    cookbook texts do not count. Only what the player has seen: no engine state."""
    seen: dict[str, str | None] = dict.fromkeys(names)
    room = None
    for observation in observations:
        room = (match.group(1) if (match := ROOM.match(observation)) else room)
        if _is_cookbook(observation):
            continue
        for name in names:
            if re.search(rf"\b{re.escape(name)}\b", observation):
                seen[name] = room
    return [seen[name] for name in names]


def missed_ingredient(episode: Episode) -> bool:
    """Whether `episode` ended neither won nor lost while a recipe ingredient was never taken
    (or the cookbook never read): the agent ran out of steps before it had what the meal needs,
    not while cooking it."""
    if episode.terminated:
        return False
    recipe = read_recipe(episode.observations)
    if recipe is None:
        return True
    taken = {action.removeprefix("take ") for action, observation
             in zip(episode.actions, episode.observations[1:])
             if action.startswith("take ") and observation.startswith("You take")}
    return not set(recipe[0]) <= taken


def step_tail(state: Episode, style: str = "notebook") -> str:
    """The per-step question about `state`: `"\\nValid actions: a, b\\nAction: "` (notebook),
    `"\\nAction: "` (compact), `"\\nInventory: a knife\\nAction: "` (inventory) or that with a
    `"\\nRecipe: ..."` line before it (recipe; `recipe_text` of the state's observations), or
    `"\\nMissing: a, b\\nTo do: c, d\\nAction: "` (checklist: `checklist`, "nothing" for an
    empty list, `"\\nRecipe: not read yet\\nAction: "` before the cookbook is read), or that with
    each missing item's whereabouts (locate: `"a (here), b (in the pantry), c (not seen)"`)."""
    check_style(style)
    if style == "notebook":
        return TAIL.format(", ".join(state.valid_actions))
    if style == "compact":
        return COMPACT_TAIL
    if state.inventory is None:
        raise ValueError(f"prompt style {style!r} needs the state's inventory")
    if style == "inventory":
        return INVENTORY_TAIL.format(state.inventory)
    if style in ("checklist", "locate"):
        todo = checklist(state.observations, state.inventory)
        if todo is None:
            return UNREAD_TAIL.format(UNREAD_RECIPE)
        missing, directions = todo
        if style == "locate":
            here = current_room(state.observations)
            places = ["not seen" if room is None else "here" if room == here else f"in the {room}"
                      for room in last_seen(state.observations, missing)]
            missing = [f"{name} ({place})" for name, place in zip(missing, places)]
        return CHECKLIST_TAIL.format(*(", ".join(part) or "nothing"
                                       for part in (missing, directions)))
    return RECIPE_TAIL.format(recipe_text(state.observations), state.inventory)


def build_prompt(episode: Episode, max_history: int | None = None,
                 style: str = "notebook") -> str:
    """The full prompt (prefix + tail) for the episode's current step."""
    return "".join(prompt_pieces(episode, max_history)) + step_tail(episode, style)
