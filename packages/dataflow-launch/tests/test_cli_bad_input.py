"""Bad input to the run commands: one clear line on stderr, exit 2, nothing created."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from dataflow_testing.ports import free_port
from run_helpers import EXAMPLES, TINY_RUN, assert_one_error_line, cli, sets

ONLINE = EXAMPLES / "disaggregated_online.yaml"


def run_with(tmp_path: Path, *overrides: str, command: str = "run", config: Path = ONLINE):
    out = tmp_path / "run"
    result = cli(command, config, *sets(*TINY_RUN, f"run.out_dir={out}", *overrides), timeout=60)
    return result, out


def test_unknown_config_key_is_named(tmp_path):
    result, out = run_with(tmp_path, "trainer.learning_rate=0.1")
    assert_one_error_line(result, "run", "trainer.learning_rate: unknown key")
    assert not out.exists()


def test_invalid_value_is_named(tmp_path):
    result, out = run_with(tmp_path, "trainer.lr=-1")
    assert_one_error_line(result, "run", "trainer.lr", "greater than 0")
    assert not out.exists()


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    result, out = run_with(tmp_path, f"target.model_dir={missing}", "target.builtin=null")
    assert_one_error_line(result, "run", "target.model_dir", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "produce", "consume"])
def test_wrong_ledger_scheme(tmp_path, command):
    result, out = run_with(tmp_path, "ledger.uri=postgres://db/run", command=command)
    assert_one_error_line(result, command, "ledger.uri", "postgres")
    assert not out.exists()


def test_noop_ledger_refused_for_disaggregated_online(tmp_path):
    result, out = run_with(tmp_path, "ledger.uri=noop://")
    assert_one_error_line(result, "run", "ledger.uri", "sqlite")
    assert not out.exists()


def test_store_unreachable(tmp_path):
    port = free_port()  # no Mooncake master listens there
    result, out = run_with(tmp_path, f"store.uri=mooncake://127.0.0.1:{port}")
    line = assert_one_error_line(result, "run")
    assert f"127.0.0.1:{port}" in line
    assert not out.exists()


def test_port_in_use_by_something_else(tmp_path):
    """The Redis ledger's port is taken by a listener that is not Redis."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        result, out = run_with(
            tmp_path, f"ledger.uri=redis://127.0.0.1:{port}/0", "ledger.options.timeout_s=2"
        )
    line = assert_one_error_line(result, "run")
    assert str(port) in line
    assert not out.exists()


def test_malformed_dataset_lines_are_named(tmp_path):
    data = tmp_path / "prompts.jsonl"
    good = (
        '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}'
    )
    data.write_text(f'{good}\nnot json\n{good}\n{{"conversations": 3}}\n')
    result, out = run_with(tmp_path, f"data.path={data}")
    assert_one_error_line(result, "run", "prompts.jsonl", "2", "4")
    assert not out.exists()


def test_colocated_config_refused_by_produce(tmp_path):
    result, out = run_with(tmp_path, command="produce", config=EXAMPLES / "colocated_online.yaml")
    assert_one_error_line(result, "produce", "colocated_online", "dataflow-launch run")
    assert not out.exists()


def test_export_needs_a_run_directory(tmp_path):
    result = cli("export", tmp_path, "--format", "sglang", "--out", tmp_path / "draft", timeout=60)
    assert_one_error_line(result, "export", "no config.yaml")
    assert not (tmp_path / "draft").exists()


def test_every_command_has_help():
    for command in ("demo", "run", "produce", "consume", "export", "status"):
        result = cli(command, "--help", timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: dataflow-launch {command}")


@pytest.mark.parametrize(("command", "role"), [("produce", "producer"), ("consume", "trainer")])
def test_a_role_command_refuses_a_one_process_topology(tmp_path, command, role):
    colocated = EXAMPLES / "colocated_online.yaml"
    result, out = run_with(tmp_path, command=command, config=colocated)
    assert_one_error_line(
        result, command, f"runs the {role} of a disaggregated run", "'colocated_online'", "run`"
    )
    assert not out.exists()
