"""Prompt data: JSONL loading (ShareGPT or token ids), loss masks, and PromptTask building."""

from dataflow.launch.data.chat import encode_conversation, normalise_conversation
from dataflow.launch.data.jsonl import BadLine, MalformedRecord, read_records
from dataflow.launch.data.prompts import Prompt, PromptSet, demo_prompts_path, load_prompts
from dataflow.launch.data.tasks import build_tasks, pass_order, task_id

__all__ = [
    "BadLine",
    "MalformedRecord",
    "Prompt",
    "PromptSet",
    "build_tasks",
    "demo_prompts_path",
    "encode_conversation",
    "load_prompts",
    "normalise_conversation",
    "pass_order",
    "read_records",
    "task_id",
]
