"""TextWorld games: step-limit semantics, termination vs truncation, lockstep, prompts, agent."""

import dataclasses
import logging
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import text
from jaxrl_llm.text import ByteTokenizer
from jaxrl_llm.agent import AgentConfig, play
from jaxrl_llm.evaluation import summarize, wilson_interval
from jaxrl_llm.envs.textworld import (Episode, GameConfig, TextWorldBatch, build_prompt,
                                      checklist, inventory_text, missed_ingredient,
                                      prompt_pieces, read_recipe, recipe_text, step_tail,
                                      current_room, last_seen)

pytestmark = pytest.mark.textworld


@pytest.fixture(scope="module")
def games():
    with TextWorldBatch(GameConfig(step_limit=6), 3) as batch:
        yield batch


def random_actions(episodes, rng):
    return [rng.choice(e.valid_actions) if not e.done else None for e in episodes]


def test_step_limit_is_the_number_of_actions_and_truncates(games):
    rng = np.random.default_rng(0)
    episodes = games.reset([1, 2, 3], "train")
    steps = 0
    while not all(e.done for e in episodes):
        episodes = games.step(random_actions(episodes, rng))
        steps += 1
    for e in episodes:
        assert e.num_steps <= 6
        if not e.terminated:
            assert e.truncated and e.num_steps == 6
    assert steps == 6  # random play never finishes this task in 6 actions


def test_gold_path_terminates_with_success():
    with TextWorldBatch(GameConfig(step_limit=64), 1) as batch:
        batch.reset([5], "test", gold=True)
        for action in batch.gold_actions(0):
            (episode,) = batch.step([action])
            if episode.done:
                break
    assert episode.success and episode.terminated and not episode.truncated
    assert episode.score == pytest.approx(1.0)


def test_lockstep_equals_one_by_one(games):
    rng = np.random.default_rng(1)
    actions_per_step = []
    episodes = games.reset([11, 12, 13], "dev")
    while not all(e.done for e in episodes):
        actions = random_actions(episodes, rng)
        actions_per_step.append(actions)
        episodes = games.step(actions)
    batched = [(e.observations, e.rewards, e.score, e.truncated) for e in episodes]
    with TextWorldBatch(GameConfig(step_limit=6), 1) as single:
        for game, seed in enumerate([11, 12, 13]):
            (e,) = single.reset([seed], "dev")
            for actions in actions_per_step:
                if actions[game] is not None:
                    (e,) = single.step([actions[game]])
            assert (e.observations, e.rewards, e.score, e.truncated) == batched[game]


def test_prompt_matches_notebook_format():
    episode = Episode(seed=0, fold="train", task="Cook.", observations=["Kitchen. ", "Done."],
                      actions=["look around"], valid_actions=["eat meal", "look around"])
    expected = ("# TASK: Cook.\nChoose exactly one valid action."
                "\n# STEP 0 \nObs: Kitchen. \nAction: look around"
                "\n# STEP 1 \nObs: Done."
                "\nValid actions: eat meal, look around\nAction: ")
    assert build_prompt(episode) == expected


def test_inventory_tail_follows_the_pickups_of_a_gold_path():
    """The inventory style's tail is what the player carries in that state, one line."""
    assert inventory_text("Inventory (maximum capacity is 4 items): \n  a cookbook\n  a knife\n"
                          ) == "a cookbook, a knife"
    with TextWorldBatch(GameConfig(), 1) as batch:
        (episode,) = batch.reset([5], "train", gold=True)
        carried = []
        for action in batch.gold_actions(0)[:8]:
            assert all(item in episode.inventory for item in carried)
            tail = step_tail(episode, "inventory")
            assert tail == f"\nInventory: {episode.inventory}\nAction: " and "\n" not in \
                episode.inventory
            (episode,) = batch.step([action])
            if action.startswith("take ") and "You take" in episode.observations[-1]:
                carried.append(action.removeprefix("take "))
        assert carried and all(item in episode.inventory for item in carried)
    for style in ("inventory", "recipe", "checklist", "locate"):
        with pytest.raises(ValueError, match=f"'{style}' needs the state's inventory"):
            step_tail(Episode(seed=0, fold="train", task="", observations=["Kitchen."]), style)


COOKBOOK = ("Gather all following ingredients and follow the directions to prepare this tasty "
            "meal.\n\nIngredients:\n  block of cheese\n  red apple\n\nDirections:\n"
            "  slice the block of cheese\n  grill the red apple\n  prepare meal\n\n")


def test_recipe_tail_is_the_cookbook_once_it_is_read():
    """The recipe style's first line is the last cookbook read (ingredients; directions)."""
    assert recipe_text(["Kitchen.", COOKBOOK, "You take the knife."]) == (
        "block of cheese, red apple; slice the block of cheese, grill the red apple, prepare meal")
    assert recipe_text(["Kitchen."]) == "not read yet"
    with TextWorldBatch(GameConfig(), 1) as batch:
        (episode,) = batch.reset([5], "train", gold=True)
        for action in batch.gold_actions(0):
            recipe = recipe_text(episode.observations)
            assert step_tail(episode, "recipe") == (
                f"\nRecipe: {recipe}\nInventory: {episode.inventory}\nAction: ")
            assert (recipe == "not read yet") == ("read cookbook" not in episode.actions)
            (episode,) = batch.step([action])
        ingredients, directions = recipe_text(episode.observations).split("; ")
        assert episode.success and directions.endswith("prepare meal")
        assert all(f"take {item}" in episode.actions for item in ingredients.split(", "))


def test_checklist_is_what_the_recipe_still_asks_of_the_inventory():
    """Hand-made states: an ingredient is missing until carried, a direction is left until the
    carried ingredient shows its participle, a knife is missing while a cut is left, and a
    carried meal leaves nothing; on a gold path the lists only shrink and are empty when the
    meal is eaten."""
    read = ["Kitchen.", COOKBOOK]
    assert checklist(["Kitchen."], "a knife") is None
    assert checklist(read, "a cookbook, a knife") == (
        ["block of cheese", "red apple"],
        ["slice the block of cheese", "grill the red apple", "prepare meal"])
    assert checklist(read, "a knife, a sliced block of cheese, a raw red apple") == (
        [], ["grill the red apple", "prepare meal"])
    # Grilling an unsliced cheese does not slice it; the apple's grill is its own direction.
    assert checklist(read, "a grilled block of cheese, a grilled red apple") == (
        ["knife"], ["slice the block of cheese", "prepare meal"])
    assert checklist(read, "a cookbook") == (
        ["block of cheese", "red apple", "knife"],
        ["slice the block of cheese", "grill the red apple", "prepare meal"])
    assert checklist(read, "a sliced block of cheese, a grilled red apple") == (
        [], ["prepare meal"])  # no cut left: no knife needed
    assert checklist(read, "a knife, a meal") == ([], [])
    state = lambda inventory, observations=read: Episode(
        seed=0, fold="train", task="", observations=observations, inventory=inventory)
    assert step_tail(state("a knife, a sliced block of cheese"), "checklist") == (
        "\nMissing: red apple\nTo do: grill the red apple, prepare meal\nAction: ")
    assert step_tail(state("a meal"), "checklist") == (
        "\nMissing: nothing\nTo do: nothing\nAction: ")
    assert step_tail(state("a knife", ["Kitchen."]), "checklist") == (
        "\nRecipe: not read yet\nAction: ")
    with TextWorldBatch(GameConfig(), 1) as batch:
        (episode,) = batch.reset([5], "train", gold=True)
        sizes = []
        for action in batch.gold_actions(0):
            todo = checklist(episode.observations, episode.inventory)
            assert (todo is None) == ("read cookbook" not in episode.actions)
            if todo is not None:
                sizes.append(len(todo[0]) + len(todo[1]))
            (episode,) = batch.step([action])
        assert episode.success and sizes == sorted(sizes, reverse=True) and sizes[-1] == 0
        ingredients, directions = read_recipe(episode.observations)
        reading = episode.actions.index("read cookbook")
        knife = (any(d.split()[0] in ("slice", "dice", "chop") for d in directions)
                 and "take knife" not in episode.actions[:reading])
        assert knife and sizes[0] == len(ingredients) + len(directions) + knife


def test_missed_ingredient_is_out_of_steps_before_taking_the_recipes_food():
    """Hand-made games: a game that ran out of steps counts as missing an ingredient until it
    has read the cookbook and taken each of its ingredients (a refused take does not count);
    won and lost games never do. The summary reports the share."""
    def game(actions, observations, **flags):
        return Episode(seed=0, fold="test", task="", observations=["Kitchen."] + observations,
                       actions=actions, truncated=not flags, **flags)

    read = ["read cookbook"], [COOKBOOK]
    unread = game(["take knife"], ["You take the knife."])
    one = game(read[0] + ["take red apple"], read[1] + ["You take the red apple."])
    refused = game(read[0] + ["take red apple", "take block of cheese"],
                   read[1] + ["You take the red apple.", "You can't see that."])
    both = game(read[0] + ["take block of cheese", "take red apple"],
                read[1] + ["You take the block of cheese.", "You take the red apple."])
    lost = game(read[0] + ["eat red apple"], read[1] + ["You eat the red apple."], failure=True)
    won = game(["take knife"], ["You take the knife."], success=True)
    assert [missed_ingredient(e) for e in (unread, one, refused, both, lost, won)] == [
        True, True, True, False, False, False]
    summary = summarize([unread, both, lost, won], [])
    assert (summary["success_rate"], summary["failure_rate"],
            summary["missed_ingredient_rate"]) == (0.25, 0.25, 0.25)


def test_task_line_kept_at_step_max_history():
    """Notebook 000 loses the `# TASK:` line at exactly step == max_history (`>` for `>=`)."""
    obs = [f"obs {i}" for i in range(4)]
    episode = Episode(seed=0, fold="train", task="Cook.", observations=obs,
                      actions=["a", "b", "c"], valid_actions=["x"])
    for max_history in (0, 1, 2, 3, 5):
        prompt = build_prompt(episode, max_history=max_history)
        assert prompt.startswith("# TASK: Cook.\n")
        assert prompt.count("# STEP") == min(max_history, 3) + 1


def test_prefix_only_grows_without_max_history():
    e = Episode(seed=0, fold="train", task="T", observations=["o0"], valid_actions=["a"])
    before = prompt_pieces(e)
    e.actions.append("a")
    e.observations.append("o1")
    after = prompt_pieces(e)
    assert after[:len(before)] == before and len(after) == len(before) + 2


def test_close_waits_for_every_engine():
    # An engine's __del__ closes it again and writes to its JVM while the JVM is alive (a
    # BrokenPipeError on stderr when it is exiting): close() must leave no JVM alive.
    batch = TextWorldBatch(GameConfig(step_limit=2), 3)
    batch.reset([0, 1, 2], "test")
    processes = [env._gateway.java_process for env in batch._envs]
    batch.close()
    assert all(p.poll() is not None for p in processes)


def test_bad_game_inputs():
    with pytest.raises(ValueError, match="unknown game 'zork'"):
        GameConfig(game_name="zork")
    with pytest.raises(ValueError, match="step_limit must be >= 1"):
        GameConfig(step_limit=-1)
    with pytest.raises(ValueError, match="unknown fold 'valid'"), \
            TextWorldBatch(GameConfig(), 1) as batch:
        batch.reset([0], "valid")
    with pytest.raises(ValueError, match="num_games must be >= 1"):
        TextWorldBatch(GameConfig(), 0)
    with pytest.raises(ValueError, match="unknown prompt style 'chat'"):
        AgentConfig(prompt_style="chat")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        AgentConfig(temperature=0.0)


def test_score_mode_refuses_a_state_without_valid_actions(games, monkeypatch):
    from jaxrl_llm.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.tiny(vocab_size=257, max_seq_len=8192), rngs=nnx.Rngs(0))
    reset = games.reset

    def no_actions(seeds, fold, gold=False):
        episodes = reset(seeds, fold, gold)
        episodes[1].valid_actions = []
        return episodes

    monkeypatch.setattr(games, "reset", no_actions)
    with pytest.raises(ValueError, match=r"seeds \[22\] offer no valid action"):
        play(model, ByteTokenizer(), games, [21, 22, 23], "train", jax.random.key(0),
             AgentConfig(cache_len=8192))


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)


def test_locate_names_where_each_missing_item_was_last_seen():
    """An item's whereabouts are the room of the last observation naming it (a room's
    description or an opened container), never the cookbook's list, matched as whole words;
    the tail says "here" in that room. On gold paths every ingredient taken is "here"."""
    kitchen = ("You are in the kitchen. You see a fridge that is closed. You also see a counter "
               "that has a knife, and a cookbook on it.")
    observations = [kitchen, COOKBOOK, "You open the fridge. The fridge contains a red apple.",
                    "You are in the pantry. There is a shelf that has a watermelon, and a block "
                    "of cheese on it.", kitchen]
    assert current_room(observations) == "kitchen" and current_room(["Kitchen."]) is None
    assert last_seen(observations[:2], ["red apple", "knife"]) == [None, "kitchen"]
    assert last_seen(observations, ["red apple", "block of cheese", "knife", "water"]) == [
        "kitchen", "pantry", "kitchen", None]
    state = lambda inventory, seen=observations: Episode(
        seed=0, fold="train", task="", observations=seen, inventory=inventory)
    assert step_tail(state("a cookbook"), "locate") == (
        "\nMissing: block of cheese (in the pantry), red apple (here), knife (here)\nTo do: "
        "slice the block of cheese, grill the red apple, prepare meal\nAction: ")
    assert step_tail(state("a knife, a red apple", observations[:4]), "locate") == (
        "\nMissing: block of cheese (here)\nTo do: slice the block of cheese, grill the red "
        "apple, prepare meal\nAction: ")
    assert step_tail(state("a meal"), "locate") == step_tail(state("a meal"), "checklist")
    assert step_tail(state("", [kitchen]), "locate") == "\nRecipe: not read yet\nAction: "
    with TextWorldBatch(GameConfig(step_limit=32), 1) as batch:
        for seed in (3, 5, 11):
            (episode,) = batch.reset([seed], "train", gold=True)
            taken = 0
            for action in batch.gold_actions(0):
                item = action.removeprefix("take ")
                if action.startswith("take ") and read_recipe(episode.observations):
                    assert f"{item} (here)" in step_tail(episode, "locate") or (
                        item not in step_tail(episode, "checklist"))
                    taken += item in read_recipe(episode.observations)[0]
                (episode,) = batch.step([action])
            assert episode.success and taken == len(read_recipe(episode.observations)[0])


@pytest.mark.parametrize("mode,max_history,style", [("score", None, "notebook"),
                                                    ("generate", None, "notebook"),
                                                    ("score", 2, "notebook"),
                                                    ("score", None, "compact"),
                                                    ("score", None, "inventory"),
                                                    ("score", None, "recipe"),
                                                    ("score", None, "checklist"),
                                                    ("score", None, "locate")])
def test_agent_prompts_equal_full_prompt_tokens(games, mode, max_history, style):
    """Incremental prefill feeds exactly the tokens of the whole prompt at every step."""
    from jaxrl_llm.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.tiny(vocab_size=257, max_seq_len=8192), rngs=nnx.Rngs(0))
    tokenizer = ByteTokenizer()
    config = AgentConfig(mode=mode, greedy=False, max_action_tokens=4, cache_len=8192,
                         max_history=max_history, prompt_style=style)
    episodes, transitions = play(model, tokenizer, games, [21, 22, 23], "train",
                                 jax.random.key(0), config)
    assert len(transitions) == sum(e.num_steps for e in episodes)
    for t in transitions:
        e = episodes[t.game]
        replay = Episode(seed=e.seed, fold=e.fold, task=e.task,
                         observations=e.observations[:t.step + 1], actions=e.actions[:t.step])
        expected = text.encode_pieces(tokenizer, prompt_pieces(replay, max_history))
        # The whole history is the concatenation of the chunks fed so far.
        fed = (t.context_ids if max_history is not None else
               [i for s in transitions if s.game == t.game and s.step <= t.step
                for i in s.context_ids])
        assert fed == expected
        tail = tokenizer.decode(t.tail_ids)
        assert tail.endswith("\nAction:")
        assert tail.startswith("\nValid actions: ") == (style == "notebook")
        assert tail.startswith("\nInventory: ") == (style == "inventory")
        assert tail.startswith("\nRecipe: ") == (style == "recipe") or style in ("checklist",
                                                                                "locate")
        if mode == "score":
            assert t.valid and t.candidate_ids[t.choice][-1] == tokenizer.eos_token_id
            assert len(t.candidate_ids) == len(set(map(tuple, t.candidate_ids)))
    rewards = [t.reward for t in transitions if t.game == 0]
    assert sum(rewards) == pytest.approx(sum(episodes[0].rewards))
    last = [t for t in transitions if t.game == 0][-1]
    assert last.truncated == episodes[0].truncated and last.terminated == episodes[0].terminated
    summary = summarize(episodes, transitions)
    assert summary["games"] == 3 and 0 <= summary["invalid_rate"] <= 1


@pytest.mark.parametrize("style,max_history,noise", [
    ("compact", None, 0.0), ("notebook", None, 0.0), ("compact", 2, 0.0), ("compact", None, 0.4),
    ("notebook", 2, 0.4), ("inventory", None, 0.4), ("recipe", None, 0.4),
    ("checklist", None, 0.4), ("locate", None, 0.4)])
def test_encoded_expert_episodes_hold_the_prompts_play_feeds(tmp_path, style, max_history,
                                                             noise):
    """Each learned step of a packed game is its per-step prompt: history + tail, then actions
    (a detour of a noisy path has no branch, but stays in the history of later steps)."""
    from jaxrl_llm.data import encode_episode, expert_episodes

    tokenizer = ByteTokenizer()
    episodes = lambda: expert_episodes(GameConfig(), [3], "train", cache_dir=str(tmp_path),
                                       progress=False, noise=noise)
    (row,) = episodes()
    assert episodes()[0] == row
    assert len(row["actions"]) == len(row["valid_actions"]) == len(row["inventories"]) == len(
        row["observations"]) - 1
    learned = [step for step, trained in enumerate(row["trained"]) if trained]
    assert (len(learned) < len(row["actions"])) == (noise > 0)
    packed, gold = encode_episode(tokenizer, row, style, max_history, candidates=True)
    steps = [(p, s) for p in packed for s in range(len(p.decisions))]
    assert len(steps) == len(learned)
    action_tokens = 0
    for n, (step, (p, s)) in enumerate(zip(learned, steps)):
        valid = row["valid_actions"][step]
        state = Episode(seed=3, fold="train", task=row["task"],
                        observations=row["observations"][:step + 1],
                        actions=row["actions"][:step], valid_actions=valid,
                        inventory=row["inventories"][step])
        tail = step_tail(state, style)
        expected = text.encode_prompt(tokenizer, prompt_pieces(state, max_history), tail)
        decision = p.decisions[s]
        seen = (p.branch[:decision + 1] == -1) | (p.branch[:decision + 1] == s)
        assert p.tokens[:decision + 1][seen].tolist() == expected
        assert p.positions[decision] == len(expected) - 1
        leaves = p.tokens[(p.branch == s) & (p.leaf >= 0)].tolist()
        assert leaves == [i for a in valid for i in text.encode_action(tokenizer, tail, a)]
        action_tokens += len(text.encode_action(tokenizer, tail, row["actions"][step]))
        if gold[n] >= 0:
            assert valid[gold[n]] == row["actions"][step]
    sft, _ = encode_episode(tokenizer, row, style, max_history)
    assert sum(len(p.targets) for p in sft) == action_tokens


def test_noisy_expert_paths_recover_from_every_detour(tmp_path):
    """DART data: detours are other valid actions, the expert's recovery still wins each game,
    and the draws are those of the noise seed."""
    from jaxrl_llm.data import expert_episodes

    paths = lambda noise, seed=0: expert_episodes(GameConfig(), range(4), "train", noise=noise,
                                                  noise_seed=seed, progress=False)
    gold, noisy = paths(0.0), paths(0.3)
    assert all(all(row["trained"]) for row in gold)
    assert all(noisy["success"]) and all(gold["success"])
    detours = 0
    for row, expert in zip(noisy, gold):
        for action, valid, trained in zip(row["actions"], row["valid_actions"], row["trained"]):
            assert action in valid or trained  # a detour is a valid action (gold ones may not be)
            detours += not trained
        assert row["actions"] != expert["actions"] or all(row["trained"])
    assert detours > 0
    assert paths(0.3).to_list() == noisy.to_list()
    assert paths(0.3, seed=1)["actions"] != noisy["actions"]
    with pytest.raises(ValueError, match="noise must be in"):
        paths(1.0)


def test_sampled_negatives_are_the_gold_action_and_k_other_valid_ones(tmp_path):
    from jaxrl_llm.data import encode_episode, expert_episodes

    tokenizer = ByteTokenizer()
    (row,) = expert_episodes(GameConfig(), [3], "train", cache_dir=str(tmp_path), progress=False)
    encode = lambda seed, k=3: encode_episode(tokenizer, row, "compact", candidates=True,
                                              negatives=k, rng=np.random.default_rng(seed))
    (packed,), gold = encode(0)
    assert gold == [0] * len(row["actions"])
    decode = lambda ids: tokenizer.decode(ids).strip()
    for s, (valid, action) in enumerate(zip(row["valid_actions"], row["actions"])):
        leaves = [decode(packed.tokens[(packed.branch == s) & (packed.leaf == c)].tolist()[:-1])
                  for c in range(packed.leaf_lengths.shape[1]) if packed.leaf_lengths[s, c]]
        assert leaves[0] == action and len(leaves) == 1 + min(3, len(valid) - 1)
        assert len(set(leaves)) == len(leaves) and set(leaves[1:]) <= set(valid) - {action}
    assert encode(0)[0][0].tokens.tolist() == packed.tokens.tolist()  # seeded
    assert encode(1)[0][0].tokens.tolist() != packed.tokens.tolist()
    with pytest.raises(ValueError, match="negatives"):
        encode_episode(tokenizer, row, "compact", negatives=3, rng=np.random.default_rng(0))


def test_expert_dataset_round_trips_through_cache(tmp_path):
    from jaxrl_llm.data import expert_dataset

    tokenizer = ByteTokenizer()
    first = expert_dataset(GameConfig(), [3], "train", tokenizer, max_history=2,
                           cache_dir=str(tmp_path), progress=False)
    assert first[-1]["done"] and sum(first["reward"]) > 0
    assert first[0]["step"] == 0 and first[0]["prompt"].startswith("# TASK:")
    assert tokenizer.decode(first[0]["prompt_ids"]) + " " == first[0]["prompt"]
    assert tokenizer.decode(first[0]["action_ids"]) == " " + first[0]["action"]
    again = expert_dataset(GameConfig(), [3], "train", tokenizer, max_history=2,
                           cache_dir=str(tmp_path), progress=False)
    assert again.to_list() == first.to_list() and len(list(tmp_path.iterdir())) == 1


def test_thread_pool_plays_the_same_games():
    def run(workers):
        with TextWorldBatch(GameConfig(step_limit=3), 3, workers=workers) as batch:
            episodes = batch.reset([0, 1, 2], "train")
            for _ in range(3):
                episodes = batch.step([e.valid_actions[0] for e in episodes])
            return [(e.observations, e.rewards, e.truncated) for e in episodes]

    assert run(workers=3) == run(workers=1)


def test_baselines_gold_solves_with_room_and_random_is_valid():
    from jaxrl_llm.agent import play_baseline
    from jaxrl_llm.evaluation import summarize

    with TextWorldBatch(GameConfig(step_limit=32), 2) as batch:
        gold = summarize(*play_baseline(batch, [0, 1], "test", "gold", np.random.default_rng(0)))
        episodes, transitions = play_baseline(batch, [0, 1], "test", "random",
                                              np.random.default_rng(0))
    assert gold["success_rate"] == 1.0 and gold["mean_score"] == 1.0
    assert transitions and all(t.valid for t in transitions)
    assert all(e.done for e in episodes)
    with pytest.raises(ValueError, match="baseline policy must be one of"):
        play_baseline(batch, [0, 1], "test", "expert", np.random.default_rng(0))


@pytest.mark.parametrize("policy", ["random", "gold"])
def test_one_play_at_the_largest_limit_summarizes_every_limit(policy):
    """Cutting episodes played at limit 24 to 12 gives what playing at limit 12 gives; the gold
    path succeeds in some games within 24 steps but in none within 12 (gold paths have 10-26 steps)."""
    from jaxrl_llm.agent import play_baseline
    from jaxrl_llm.evaluation import evaluate_policy, summarize_limits

    def run(limit):
        with TextWorldBatch(GameConfig(step_limit=limit), 3) as batch:
            return play_baseline(batch, [0, 1, 2], "test", policy, np.random.default_rng(0))

    long_episodes, long_transitions = run(24)
    short_episodes, short_transitions = run(12)
    cut = [e.cut(12) for e in long_episodes]
    assert [(e.observations, e.actions, e.rewards, e.scores, e.score, e.success, e.truncated)
            for e in cut] == [(e.observations, e.actions, e.rewards, e.scores, e.score, e.success,
                               e.truncated) for e in short_episodes]
    summaries = summarize_limits(long_episodes, long_transitions, (12, 24))
    # The harness of every experiment plays at the largest limit and cuts: the same table.
    play_chunk = lambda games, seeds, on_step: play_baseline(
        games, seeds, "test", policy, np.random.default_rng(0), on_step)
    assert evaluate_policy(play_chunk, 3, 3, (12, 24)) == summaries
    with pytest.raises(ValueError, match=r"num_games \(4\) to be a positive multiple"):
        evaluate_policy(play_chunk, 4, 3, (12, 24))
    assert summaries["limit_12"] == summarize(short_episodes, short_transitions)
    assert summaries["limit_24"] == summarize(long_episodes, long_transitions)
    if policy == "gold":
        assert summaries["limit_24"]["success_rate"] > summaries["limit_12"]["success_rate"] == 0


def test_cut_episode_at_a_lower_limit():
    e = Episode(seed=0, fold="test", task="T", observations=["o0", "o1", "o2", "o3"],
                actions=["a", "b", "c"], rewards=[0.0, 0.5, 0.5], scores=[0.0, 0.5, 1.0],
                success=True)
    two = e.cut(2)
    assert (two.actions, two.rewards, two.score, two.success, two.truncated, two.terminated) == (
        ["a", "b"], [0.0, 0.5], 0.5, False, True, False)
    assert two.observations == ["o0", "o1", "o2"] and e.cut(3) is e and e.cut(5) is e
    with pytest.raises(ValueError, match="step_limit must be >= 1"):
        e.cut(0)


def test_eval_cli_needs_a_run_with_sft_checkpoints(tmp_path, capsys):
    from experiments.textworld_eval import main

    with pytest.raises(FileNotFoundError, match="config.json not found"):
        main(["--policies", "sft", "--run-dir", str(tmp_path)])
    for argv, message in [(["--games", "6", "--num-envs", "4"], "--num-envs (4) must divide"),
                          (["--games", "0"], "--games and --num-envs must be >= 1"),
                          (["--step-limits", "0"], "--step-limits must be limits >= 1")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_a_killed_evaluation_resumes_from_its_record(tmp_path):
    """Chunks already in the record are not played again; the table equals an unbroken run's;
    a line cut short by the kill is dropped; a record of other settings is refused."""
    from jaxrl_llm.agent import play_baseline
    from jaxrl_llm.evaluation import (eval_record_path, evaluate_policy, read_eval_record,
                                      summarize_record)

    played = []

    def play_chunk(games, seeds, on_step):
        played.append(seeds)
        if len(played) == 2 and kill:
            raise KeyboardInterrupt
        return play_baseline(games, seeds, "test", "random", np.random.default_rng(seeds[0]),
                             on_step)

    directory, settings = str(tmp_path / "eval"), dict(policy="random")
    run = lambda: evaluate_policy(play_chunk, 4, 2, (6, 8), record_dir=directory,
                                  settings=settings)
    kill = False
    unbroken = evaluate_policy(play_chunk, 4, 2, (6, 8))
    played.clear()
    kill = True
    with pytest.raises(KeyboardInterrupt):
        run()
    header = dict(label="eval", settings=settings, num_envs=2, step_limit=8)
    record = eval_record_path(directory, header)
    with open(record, "a") as f:
        f.write('{"start": 2, "episo')  # a write cut short by the kill
    kill = False
    assert run() == unbroken
    assert played == [[0, 1], [2, 3], [2, 3]]  # the first chunk came from the record
    assert summarize_record(record, (6, 8)) == unbroken  # the table, from the record alone
    chunks = read_eval_record(record, header)
    assert sorted(chunks) == [0, 2] and all(len(e) == 2 for e, _ in chunks.values())
    assert all(t.action and not t.context_ids for _, trs in chunks.values() for t in trs)
    # Other settings (another checkpoint, say) get a record of their own.
    other = dict(header, settings=dict(policy="random", checkpoint=2))
    assert eval_record_path(directory, other) != record
    with pytest.raises(ValueError, match="records an evaluation with other settings"):
        read_eval_record(record, other)
    # A kill during the very first write leaves a header cut short: the record starts over.
    os.remove(record)
    with open(record, "w") as f:
        f.write('{"header": {"lab')
    assert run() == unbroken and sorted(read_eval_record(record, header)) == [0, 2]
    with open(record, "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match="is not an evaluation record"):
        run()
    # A record directory that cannot be made fails before a game is played.
    played.clear()
    with pytest.raises(OSError):
        evaluate_policy(play_chunk, 4, 2, (6, 8), record_dir=os.path.join(record, "sub"))
    assert played == []


def _kill_engine(games, index):
    os.kill(games._envs[index]._gateway.java_process.pid, signal.SIGKILL)
    games._envs[index]._gateway.java_process.wait()


def test_a_killed_engine_is_restarted_mid_collection_and_mid_eval(caplog):
    """A dead JVM (killed by its pid) costs one warning line: play and evaluation go on, and
    every episode equals the one an unbroken engine gives."""
    from jaxrl_llm.agent import play_baseline
    from jaxrl_llm.evaluation import evaluate_policy
    from jaxrl_llm.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.tiny(vocab_size=257, max_seq_len=8192), rngs=nnx.Rngs(0))
    agent = AgentConfig(greedy=False, prompt_style="compact", cache_len=8192)
    results = []
    for kill in (False, True):
        with TextWorldBatch(GameConfig(step_limit=6), 2) as games:
            steps = []

            def on_step(episodes):
                steps.append(1)
                if kill and len(steps) == 2:
                    _kill_engine(games, 1)

            with caplog.at_level(logging.WARNING):
                results.append(play(model, ByteTokenizer(), games, [3, 4], "train",
                                    jax.random.key(0), agent, on_step=on_step))
    assert [dataclasses.asdict(e) for e in results[0][0]] == [
        dataclasses.asdict(e) for e in results[1][0]]
    assert sum("crashed" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()

    def gold(kill_at):
        def play_chunk(games, seeds, on_step):
            def step(episodes):
                on_step(episodes)
                if seeds[0] == kill_at and episodes[0].num_steps == 3:
                    _kill_engine(games, 0)  # dies mid-chunk; another dies between chunks below
            out = play_baseline(games, seeds, "test", "gold", np.random.default_rng(0), step)
            if seeds[0] == kill_at:
                _kill_engine(games, 1)
            return out
        return evaluate_policy(play_chunk, 4, 2, (8, 16))

    with caplog.at_level(logging.WARNING):
        assert gold(kill_at=0) == gold(kill_at=None)
    assert sum("crashed" in r.getMessage() for r in caplog.records) == 2


def test_a_record_that_cannot_be_written_keeps_the_chunks_before(tmp_path, monkeypatch):
    from jaxrl_llm import evaluation
    from jaxrl_llm.agent import play_baseline

    play_chunk = lambda games, seeds, on_step: play_baseline(
        games, seeds, "test", "random", np.random.default_rng(seeds[0]), on_step)
    directory = str(tmp_path / "eval")
    run = lambda: evaluation.evaluate_policy(play_chunk, 4, 2, (6,), record_dir=directory,
                                             settings=dict(policy="random"))
    writes = []

    def disk_full_after_one_chunk(path, mode="r", *args, **kwargs):
        if "a" in mode:
            writes.append(path)
            if len(writes) > 1:
                raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(evaluation, "open", disk_full_after_one_chunk, raising=False)
    with pytest.raises(OSError, match="games recorded before are kept.*rerun to resume"):
        run()
    monkeypatch.undo()
    (record,) = os.listdir(directory)
    header = dict(label="eval", settings=dict(policy="random"), num_envs=2, step_limit=6)
    assert sorted(evaluation.read_eval_record(os.path.join(directory, record), header)) == [0]
    assert run() == evaluation.evaluate_policy(play_chunk, 4, 2, (6,))
