from __future__ import annotations

import json
from importlib.resources import files

from dataflow.launch.builtin.make_assets import PROMPTS_FILE, write_assets
from dataflow.launch.builtin.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE

ASSETS = files("dataflow.launch").joinpath("assets")


def test_committed_assets_equal_a_fresh_regeneration(tmp_path):
    from tokenizers import Tokenizer

    write_assets(tmp_path)
    shipped_prompts = ASSETS.joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    assert (tmp_path / PROMPTS_FILE).read_text(encoding="utf-8") == shipped_prompts
    # Compared by behaviour, not bytes: the JSON layout may differ between tokenizers versions.
    fresh = Tokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    shipped = Tokenizer.from_str(ASSETS.joinpath(TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert fresh.get_vocab() == shipped.get_vocab()
    texts = [
        turn["value"]
        for line in shipped_prompts.splitlines()
        for turn in json.loads(line)["conversations"]
    ]
    assert [e.ids for e in fresh.encode_batch(texts)] == [
        e.ids for e in shipped.encode_batch(texts)
    ]


def test_assets_are_small_and_well_formed():
    tokenizer_bytes = len(ASSETS.joinpath(TOKENIZER_FILE).read_bytes())
    assert tokenizer_bytes < 300_000
    lines = ASSETS.joinpath(PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    assert 200 <= len(lines) <= 1000
    records = [json.loads(line) for line in lines]
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles[0] == "human" and "gpt" in roles


def test_builtin_tokenizer_has_chat_template_and_special_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token == "<|eos|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|bos|><|user|>\nWhat is 2 plus 2?<|eos|>\n<|assistant|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 500 < len(tokenizer) <= 1024
