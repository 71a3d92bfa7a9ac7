"""Hypothesis strategies producing valid instances of every record."""

from hypothesis import strategies as st

from dataflow.contracts import (
    CommitResult,
    ConsumerState,
    FeatureHandle,
    FeatureSpec,
    GcReport,
    LedgerStatus,
    ProducerState,
    PromptTask,
    ReconcileResult,
    RunMarkers,
    SampleRef,
    StoreHealth,
    WeightStatus,
    WeightVersion,
    Window,
)
from dataflow.contracts.features import DTYPE_ITEMSIZE

ids = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_:=+@-]{0,30}", fullmatch=True)
text = st.text(max_size=20)
counts = st.integers(min_value=0, max_value=2**53)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
json_maps = st.dictionaries(text, json_values, max_size=4)

feature_specs = st.builds(
    FeatureSpec,
    name=ids,
    shape=st.lists(st.integers(0, 4096), max_size=3).map(tuple),
    dtype=st.sampled_from(sorted(DTYPE_ITEMSIZE)),
)


@st.composite
def sample_refs(draw):
    specs = draw(st.lists(feature_specs, max_size=4, unique_by=lambda s: s.name))
    sid = draw(ids)
    keys = {s.name: f"{sid}/{s.name}" for s in specs}
    keys.update(draw(st.dictionaries(ids, ids, max_size=2)))
    return SampleRef(
        sample_id=sid,
        store_uri=draw(
            st.sampled_from(["memory://", "shm://run", "dir:///tmp/x", "mooncake://h:1"])
        ),
        feature_keys=keys,
        feature_specs={s.name: s for s in specs},
        generation=draw(counts),
        source_task_id=draw(st.none() | ids),
        run_id=draw(text),
        estimated_bytes=draw(counts),
        num_tokens=draw(counts),
        target_version=draw(text),
        draft_weight_version=draw(st.none() | text),
        metadata=draw(json_maps),
    )


prompt_tasks = st.builds(
    PromptTask,
    task_id=ids,
    payload=json_maps,
    max_length=st.integers(1, 1 << 20),
    attempt=st.integers(0, 100),
    target_version=text,
    draft_weight_version=st.none() | text,
    metadata=json_maps,
)
handles = st.builds(FeatureHandle, sample_id=ids, generation=counts, token=ids)
weight_versions = st.builds(
    WeightVersion,
    version_id=ids,
    step=counts,
    publish_order=counts,
    status=st.sampled_from(list(WeightStatus)),
    location=st.none() | text,
    target_version=text,
    metadata=json_maps,
)
run_markers = st.builds(
    RunMarkers,
    run_id=text,
    quantum=counts,
    durable_step=st.integers(-1, 2**40),
    producer=st.sampled_from(list(ProducerState)),
    producer_reason=text,
    consumer=st.sampled_from(list(ConsumerState)),
    consumer_reason=text,
    trained_step=st.integers(-1, 2**40),
    released_through=st.integers(-1, 2**40),
    dp_size=counts,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
ledger_statuses = st.builds(
    LedgerStatus,
    backend=text,
    durable=st.booleans(),
    markers=run_markers,
    samples=st.dictionaries(text, counts, max_size=5),
    prompts=st.dictionaries(text, counts, max_size=4),
    in_flight=counts,
    in_flight_bytes=counts,
    dropped_reasons=st.dictionaries(text, counts, max_size=3),
    latest_weight_order=counts,
    drift_mean=st.none() | finite,
    drift_max=st.none() | counts,
)
store_healths = st.builds(
    StoreHealth,
    backend=text,
    resident_samples=counts,
    resident_bytes=counts,
    active_leases=counts,
    pending_frees=counts,
    oldest_age_s=finite,
    budget_bytes=st.none() | counts,
)
gc_reports = st.builds(GcReport, counts, counts, counts, counts)
commit_results = st.builds(CommitResult, st.lists(ids).map(tuple), st.lists(ids).map(tuple))
windows = st.builds(
    Window, counts, st.lists(st.lists(ids, max_size=4).map(tuple), max_size=4).map(tuple)
)
reconcile_results = st.builds(
    ReconcileResult, counts, st.lists(ids).map(tuple), st.lists(ids).map(tuple)
)

ALL = {
    "PromptTask": prompt_tasks,
    "FeatureSpec": feature_specs,
    "SampleRef": sample_refs(),
    "FeatureHandle": handles,
    "WeightVersion": weight_versions,
    "RunMarkers": run_markers,
    "LedgerStatus": ledger_statuses,
    "StoreHealth": store_healths,
    "GcReport": gc_reports,
    "CommitResult": commit_results,
    "Window": windows,
    "ReconcileResult": reconcile_results,
}
