"""A producer process for the SIGKILL test: runs the configured producer until it is killed.

Usage: python producer_child.py CONFIG.yaml
"""

from __future__ import annotations

import sys

from dataflow.launch.config import load_config
from dataflow.launch.data import build_tasks, load_prompts
from dataflow.launch.engines import open_engine
from dataflow.launch.producer import build_producer, open_config_ledger, open_config_store


def main(path: str) -> None:
    config = load_config(path)
    engine = open_engine(config.target)
    ledger, store = open_config_ledger(config), open_config_store(config)
    prompts = load_prompts(config.data, engine.tokenizer)
    tasks = build_tasks(
        prompts.prompts,
        run_id=config.run.id,
        passes=config.data.passes,
        max_length=config.data.max_length,
        target_version=engine.info.version,
    )
    producer = build_producer(config, engine, ledger, store)
    producer.open()
    producer.ingest(tasks)
    print("producing", flush=True)
    print(producer.run().outcome, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
