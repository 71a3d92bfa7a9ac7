"""EAGLE3 as published: draft model, vocabulary map, frozen target parts, TTT objective, metrics.

Interface used by the trainer:

- :class:`Eagle3Config` (frozen): draft shape and TTT settings; ``from_target_config`` derives it
  from a target's config, with the captured layers ``[1, N//2 - 1, N - 4]`` by default.
- :func:`build_vocab_map` ``(token_counts | token ids, target_vocab, draft_vocab) -> (d2t, t2d)``.
- :class:`Eagle3DraftModel`: ``fc`` (3H -> H), one decoder layer on ``[embedding ‖ hidden]``,
  final norm, ``lm_head`` over the draft vocabulary, ``d2t``/``t2d`` buffers.
- :class:`Eagle3Objective`: the draft plus the frozen target embedding and head;
  ``forward(tensors) -> StepOutput(loss, metrics, counts, sample_loss)``,
  ``trainable_parameters()``, ``init_from_target(embedding_weight, lm_head_weight)``,
  ``set_vocab_map(d2t, t2d)``.

Batch features (leading batch dim): ``input_ids`` int64 [B,T], ``loss_mask`` int64 [B,T],
``attention_mask`` int64 [B,T] (1 = real token, right padding), ``hidden_state`` (target's last
post-norm hidden) [B,T,H], ``aux_hidden_state`` (three captured layers concatenated) [B,T,3H].
FSDP: wrap ``objective.draft`` (the only trainable module; the whole TTT unroll runs inside its
single ``forward`` call).
"""

from dataflow.train.eagle3.config import Eagle3Config, default_target_layers
from dataflow.train.eagle3.draft import Eagle3DraftModel
from dataflow.train.eagle3.metrics import count_keys, metrics_from_counts
from dataflow.train.eagle3.objective import REQUIRED_FEATURES, Eagle3Objective, StepOutput
from dataflow.train.eagle3.sequence import LocalSequence, SequenceExchange
from dataflow.train.eagle3.vocab import build_vocab_map, draft_to_target_ids

__all__ = [
    "Eagle3Config",
    "Eagle3DraftModel",
    "Eagle3Objective",
    "StepOutput",
    "REQUIRED_FEATURES",
    "SequenceExchange",
    "LocalSequence",
    "build_vocab_map",
    "count_keys",
    "default_target_layers",
    "draft_to_target_ids",
    "metrics_from_counts",
]
