"""The built-in target's tokenizer: a small byte-level BPE trained on the shipped prompt text.

The trained ``tokenizer.json`` and the chat template ship in ``dataflow/launch/assets/``;
:func:`load_builtin_tokenizer` wraps them as a ``PreTrainedTokenizerFast``. :func:`train_tokenizer`
is how those files were made (``python -m dataflow.launch.builtin.make_assets`` reruns it).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.resources import files
from typing import Any

from dataflow.launch.extras import require

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
"""Special tokens, in id order (``<|pad|>`` is id 0)."""

BPE_VOCAB_LIMIT = 1024
"""Upper bound given to the BPE trainer; the shipped corpus saturates below it (872 ids)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)
"""Chat template of the built-in tokenizer: ``<|role|>\\ncontent<|eos|>\\n`` per message.

Rendering a conversation's first ``i`` messages with ``add_generation_prompt`` yields a string
prefix of the whole rendering, which is what the assistant loss mask relies on.
"""

TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int = BPE_VOCAB_LIMIT) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (deterministic for a fixed
    input order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def load_builtin_tokenizer() -> Any:
    """The shipped tokenizer as a ``PreTrainedTokenizerFast`` with its chat template.

    Guarantees: pad id 0, ``bos``/``eos`` set, ``chat_template`` set, the same ids on every
    machine; nothing is downloaded.
    """
    transformers = require("transformers")
    path = files("dataflow.launch").joinpath("assets", TOKENIZER_FILE)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
