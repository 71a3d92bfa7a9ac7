from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dataflow.contracts import DeploymentMode, InvalidInputError
from dataflow.launch.config import (
    LaunchConfig,
    apply_overrides,
    config_from_mapping,
    dump_yaml,
    fingerprint,
    load_config,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def refused(match: str, *, path: Path | None = None, sets: tuple[str, ...] = ()) -> str:
    with pytest.raises(InvalidInputError, match=match) as info:
        load_config(path, sets)
    return str(info.value)


def test_defaults_are_resolved_for_the_default_topology():
    config = load_config()
    assert config.run.topology == "disaggregated_online"
    assert config.deployment_mode is DeploymentMode.DISAGGREGATED
    assert config.store.uri == "shm://dataflow-run"
    assert config.ledger.uri == "sqlite://runs/dataflow-run/ledger.sqlite"
    assert config.target.builtin is not None and config.target.model_dir is None
    assert config.staleness.enabled is False


@pytest.mark.parametrize(
    ("topology", "mode", "store", "ledger"),
    [
        ("colocated_offline", "local_colocated", "file:///r/features", "noop://"),
        ("colocated_online", "local_colocated", "memory://", "memory://"),
        ("disaggregated_offline", "disaggregated", "dir:///r/store", "sqlite:///r/ledger.sqlite"),
        ("disaggregated_online", "disaggregated", "shm://x", "sqlite:///r/ledger.sqlite"),
    ],
)
def test_topology_defaults(topology, mode, store, ledger):
    config = load_config(None, [f"run.topology={topology}", "run.out_dir=/r", "run.id=x"])
    assert (config.run.deployment_mode, config.store.uri, config.ledger.uri) == (
        mode,
        store,
        ledger,
    )


def test_yaml_file_and_overrides_parse_values_as_yaml_scalars(tmp_path):
    path = write(tmp_path, {"trainer": {"lr": 0.01}, "data": {"passes": 2}})
    config = load_config(
        path, ["trainer.lr=5e-4", "staleness.enabled=true", "target.aux_layer_ids=[1, 2, 5]"]
    )
    assert config.trainer.lr == 5e-4
    assert config.data.passes == 2
    assert config.staleness.enabled is True
    assert config.target.aux_layer_ids == (1, 2, 5)


def test_overrides_do_not_modify_the_input_mapping():
    data = {"trainer": {"lr": 0.01}}
    out = apply_overrides(data, ["trainer.lr=0.5"])
    assert data == {"trainer": {"lr": 0.01}} and out["trainer"]["lr"] == 0.5


def test_unknown_key_is_refused_with_its_dotted_path(tmp_path):
    message = refused("unknown key", path=write(tmp_path, {"trainer": {"learning_rate": 1.0}}))
    assert message == "invalid config: trainer.learning_rate: unknown key"
    assert (
        refused("unknown key", sets=("target.builtin.depth=3",))
        == "invalid config: target.builtin.depth: unknown key"
    )
    assert refused("unknown key", sets=("bogus.x=1",)) == "invalid config: bogus: unknown key"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.lr=-1", "trainer.lr: Input should be greater than 0 (got -1)"),
        ("trainer.batch_size='2'", "trainer.batch_size: Input should be a valid integer (got '2')"),
        ("run.seed=1.5", "run.seed: Input should be a valid integer (got 1.5)"),
        (
            "target.dtype=bf16",
            "target.dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32'",
        ),
        ("target.device=tpu", "target.device: unknown device 'tpu'"),
        ("run.id=../up", "run.id: run id '../up' contains the forbidden character '/'"),
        ("target.aux_layer_ids=[1, 1, 2]", "target.aux_layer_ids: must be three distinct"),
        ("target.builtin.hidden_size=30", "target.builtin.hidden_size: 30 must be a multiple"),
        ("flow.low_watermark=100", "flow.low_watermark: 100 must be <= high_watermark 64"),
        ("target.engine=sglang", "target.server_url: required by the sglang engine"),
    ],
)
def test_invalid_value_names_the_field(override, expected):
    message = refused("invalid config", sets=(override,))
    assert expected in message


def test_wrong_ledger_scheme_is_refused():
    message = refused("ledger", sets=("ledger.uri=postgres://db/run",))
    assert "ledger.uri: unknown ledger scheme 'postgres'" in message


def test_disaggregated_online_needs_durable_ledger_and_shared_store():
    assert "ledger.uri: disaggregated_online shares its ledger" in refused(
        "ledger", sets=("ledger.uri=memory://",)
    )
    assert "store.uri: disaggregated_online needs a store of scheme shm://" in refused(
        "store", sets=("store.uri=memory://",)
    )
    assert "run.deployment_mode" in refused(
        "deployment", sets=("run.deployment_mode=local_colocated",)
    )


def test_watermark_below_one_window_is_refused():
    message = refused(
        "window",
        sets=(
            "trainer.batch_size=8",
            "trainer.dp_size=2",
            "flow.high_watermark=8",
            "flow.low_watermark=4",
        ),
    )
    assert "flow.high_watermark: 8 is below one optimizer window (trainer quantum 16" in message


def test_bad_override_syntax_and_section_clash():
    with pytest.raises(InvalidInputError, match="must look like section.key=value"):
        load_config(None, ["trainer.lr"])
    with pytest.raises(InvalidInputError, match=r"run.seed is a value \(0\), not a section"):
        apply_overrides({"run": {"seed": 0}}, ["run.seed.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="must hold a mapping"):
        load_config(listing)
    dated = tmp_path / "dated.yaml"
    dated.write_text("run: {id: 2024-01-01}\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not a plain YAML scalar"):
        load_config(dated)


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(Exception, match="frozen"):
        config.trainer.lr = 1.0  # type: ignore[misc]


def test_dump_round_trips_and_redacts_secrets(tmp_path):
    config = load_config(None, ["store.options.token=s3cret", "run.topology=disaggregated_offline"])
    text = dump_yaml(config)
    assert "s3cret" not in text and "<redacted>" in text
    again = config_from_mapping(yaml.safe_load(dump_yaml(config, redact=False)))
    assert again == config
    assert isinstance(again, LaunchConfig)


def test_fingerprint_is_stable_and_sensitive():
    a = load_config(None, ["trainer.lr=0.01", "data.passes=2"])
    b = load_config(None, ["data.passes=2", "trainer.lr=0.01"])
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    for change in (
        "trainer.lr=0.02",
        "data.passes=3",
        "run.seed=1",
        "target.builtin.seed=5",
        "trainer.batch_size=2",
        "staleness.enabled=true",
        "run.id=other",
    ):
        assert fingerprint(load_config(None, ["trainer.lr=0.01", "data.passes=2", change])) != (
            fingerprint(a)
        ), change


def test_fingerprint_ignores_placement():
    base = [
        "trainer.lr=0.01",
        "trainer.batch_size=2",
        "flow.high_watermark=8",
        "flow.low_watermark=4",
    ]
    a = load_config(None, base)
    moved = load_config(
        None,
        [
            *base,
            "run.out_dir=/elsewhere",
            "run.topology=colocated_online",
            "store.uri=memory://",
            "ledger.uri=memory://",
            "producer.workers=4",
            "trainer.dp_size=2",
            "trainer.checkpoint_every=5",
            "store.options.token=t",
        ],
    )
    assert fingerprint(moved) == fingerprint(a)


@pytest.mark.parametrize(
    "name",
    ["colocated_offline", "colocated_online", "disaggregated_offline", "disaggregated_online"],
)
def test_each_example_config_loads(name):
    config = load_config(EXAMPLES / f"{name}.yaml")
    assert config.run.topology == name
    assert config.flow.high_watermark >= config.trainer.quantum
    assert config_from_mapping(yaml.safe_load(dump_yaml(config, redact=False))) == config


def test_every_example_file_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(
        ["colocated_offline", "colocated_online", "disaggregated_offline", "disaggregated_online"]
    )


def test_sequence_parallelism_is_refused_for_colocated_online():
    message = refused("sp_size", sets=("run.topology=colocated_online", "trainer.sp_size=2"))
    assert "trainer.sp_size: sequence parallelism (2) needs a consumer of its own" in message
    assert "colocated_online trains in the producer's process and is data-parallel only" in message


def test_sequence_parallelism_is_accepted_for_disaggregated_online():
    config = load_config(
        None,
        (
            "run.topology=disaggregated_online",
            "trainer.dp_size=2",
            "trainer.sp_size=2",
            "trainer.batch_size=1",
        ),
    )
    assert config.trainer.world_size == 4
    assert config.trainer.quantum == 2  # windows are cut over the two data-parallel groups


def test_sequence_parallelism_counts_in_the_trainer_world_size_not_the_window():
    config = load_config(
        None,
        (
            "run.topology=colocated_offline",
            "trainer.dp_size=2",
            "trainer.sp_size=2",
            "trainer.batch_size=3",
        ),
    )
    assert config.trainer.world_size == 4
    assert config.trainer.quantum == 6  # two data-parallel groups of one batch each


def test_colocated_online_refuses_a_noop_ledger_instead_of_replacing_it():
    with pytest.raises(InvalidInputError, match="colocated_online leases prompts from its ledger"):
        load_config(None, ["run.topology=colocated_online", "ledger.uri=noop://"])


@pytest.mark.parametrize("topology", ["colocated_offline", "disaggregated_offline"])
def test_offline_staleness_is_target_matching_and_a_check_of_nothing_is_refused(topology):
    config = load_config(None, [f"run.topology={topology}", "staleness.enabled=true"])
    assert config.staleness.enabled and config.staleness.require_target_match
    with pytest.raises(InvalidInputError, match="there is no draft lag to bound") as info:
        load_config(
            None,
            [
                f"run.topology={topology}",
                "staleness.enabled=true",
                "staleness.require_target_match=false",
            ],
        )
    assert "staleness.require_target_match" in str(info.value)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("run.topology=colocated_online", "ledger.uri=sqlite:///x/ledger.sqlite"),
            "ledger.uri: deployment mode 'local_colocated' runs the lightweight plane (in "
            "process: no durable transaction, no I/O) and 'sqlite:///x/ledger.sqlite' is durable",
        ),
        (
            (
                "run.topology=colocated_online",
                "run.deployment_mode=dataflow_colocated",
                "ledger.uri=memory://",
            ),
            "ledger.uri: deployment mode 'dataflow_colocated' keeps a durable ledger (resumable "
            "after a crash); 'memory://' is not durable",
        ),
        (
            ("run.topology=disaggregated_offline", "ledger.uri=memory://"),
            "ledger.uri: deployment mode 'disaggregated' keeps a durable ledger",
        ),
        (
            ("run.topology=colocated_offline", "ledger.uri=memory://"),
            "ledger.uri: colocated_offline trains retained feature files and keeps no record "
            "(its ledger is noop://); 'memory://' would never be written",
        ),
        (
            ("run.topology=colocated_offline", "run.deployment_mode=dataflow_colocated"),
            "run.deployment_mode: colocated_offline keeps no durable ledger",
        ),
    ],
)
def test_the_deployment_mode_decides_the_plane_and_a_ledger_it_cannot_run_is_refused(sets, message):
    with pytest.raises(InvalidInputError) as info:
        load_config(None, list(sets))
    assert message in str(info.value)


def test_a_durable_colocated_run_keeps_the_ledger_it_was_given(tmp_path):
    uri = f"sqlite://{tmp_path}/ledger.sqlite"
    config = load_config(
        None,
        [
            "run.topology=colocated_online",
            "run.deployment_mode=dataflow_colocated",
            f"ledger.uri={uri}",
        ],
    )
    assert config.ledger.uri == uri
    assert config.deployment_mode is DeploymentMode.DATAFLOW_COLOCATED
