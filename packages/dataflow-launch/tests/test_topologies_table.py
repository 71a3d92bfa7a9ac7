"""The topology table: every topology the config accepts has one record, and the records
drive the config defaults, the CLI's role refusals and the builders' entry points."""

from __future__ import annotations

import inspect
import typing

import pytest

from dataflow.launch.config import LaunchConfig
from dataflow.launch.config.sections import Topology
from dataflow.launch.topologies import TOPOLOGIES, TopologySpec, topology


def test_the_table_holds_exactly_the_topologies_the_config_accepts() -> None:
    assert set(TOPOLOGIES) == set(typing.get_args(Topology))


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_each_entry_resolves_to_a_builder_taking_config_and_run_dir(name: str) -> None:
    spec = TOPOLOGIES[name]
    for role in spec.entries:
        fn = spec.entry(role)  # type: ignore[arg-type]
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["config", "run_dir"], (name, role)
        assert "progress" in params, (name, role)
        if role != "produce":
            assert "resume" in params, (name, role)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_config_defaults_come_from_the_record(name: str, tmp_path) -> None:
    spec = TOPOLOGIES[name]
    config = LaunchConfig.model_validate(
        {"run": {"topology": name, "out_dir": str(tmp_path / "r"), "id": "t"}}
    )
    assert config.topology is spec
    assert config.store.uri == spec.default_store_uri("t", str(tmp_path / "r"))
    assert config.store.uri.split("://")[0] in spec.stores
    assert config.run.deployment_mode == spec.default_mode


def test_a_role_the_layout_does_not_run_is_refused_naming_the_roles() -> None:
    with pytest.raises(KeyError, match=r"colocated_online has no 'consume' role.*\['run'\]"):
        TOPOLOGIES["colocated_online"].entry("consume")


def test_an_unknown_topology_is_refused_listing_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown topology 'ring'.*colocated_offline"):
        topology("ring")


def test_a_record_without_the_builders_of_its_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="entries"):
        TopologySpec(
            name="x",
            ref_source="queue",
            separate_roles=True,
            stores=("shm",),
            default_store="shm://{run_id}",
            entries={"run": "m:f"},
        )
    with pytest.raises(ValueError, match="default store file://"):
        TopologySpec(
            name="x",
            ref_source="files",
            separate_roles=False,
            stores=("memory",),
            default_store="file://{out_dir}",
            entries={"run": "m:f"},
        )
