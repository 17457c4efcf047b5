"""The default tokenizer is built from the GGUF without torch, with transformers' ids."""

import os

import pytest

from jaxrl_llm.model import default_model_path
from jaxrl_llm.model.loading import gguf_tokenizer

TEXTS = [
    "# TASK: You are hungry! Let's cook a delicious meal.\nChoose exactly one valid action."
    "\n# STEP 0 \nObs: You are in the kitchen. A fridge, closed.\nAction: open fridge",
    "\nValid actions: take red potato, dice yellow bell pepper, go north\nAction:",
    " look around",
    "  héllo wörld, naïve café 日本語 😀 \u00a0 \t\r\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.mark.real_model
def test_gguf_tokenizer_gives_the_ids_of_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers' GGUF reader needs it: the oracle only
    path = default_model_path()
    ours = gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
    for text in TEXTS:
        for special in (False, True):
            ids = ours(text, add_special_tokens=special).input_ids
            assert ids == reference(text, add_special_tokens=special).input_ids, text
            assert ours.decode(ids) == reference.decode(ids)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(reference, name)
    assert len(ours) == len(reference) and ours.padding_side == "left"
    chat = [{"role": "user", "content": "Cook a meal."}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == \
        reference.apply_chat_template(chat, add_generation_prompt=True)
    assert ours.convert_tokens_to_ids("<|im_start|>") == 1


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="is not a GGUF file .*pass a .gguf model file"):
        gguf_tokenizer(str(bogus))
