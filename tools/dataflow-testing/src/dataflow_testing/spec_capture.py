"""What SpecForge's patched SGLang server writes into Mooncake, written the same way, for tests.

Source: sgl-project/SpecForge at commit a6b6b023, ``patches/sglang/v0.5.14/spec-capture.patch``,
file ``python/sglang/srt/spec_capture_sink.py``:

- its own ``MooncakeDistributedStore`` (``SpecCaptureSink._connect``: ``setup(...)`` from the
  ``MOONCAKE_*`` settings), every put ``ReplicateConfig(replica_num=1, with_hard_pin=True)``;
- key ``f"{store_id}/{sample_id}/g{gen}/{name}"`` (``_tkey``), value the tensor's raw bytes after
  ``tensor.detach().to("cpu").contiguous()`` (``_stage``), size ``element_size() * numel()``;
- ``replace`` → the keys are removed first (``_remove_many_quiet``); one ``batch_put_from``
  call (``put_samples``) with the buffers registered around it; any negative status removes
  every key of the batch and raises;
- result per sample ``{"sample_id", "store_id", "gen", "aux_layer_ids",
  "features": {name: {"shape": list, "dtype": str}}}`` — dtype the torch name without ``torch.``.

This writer speaks to a real ``mooncake_master`` (no mock); it is a separate client, with its own
segment, as a server process is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class SpecCaptureWriter:
    """A Mooncake client that writes tensors exactly as ``SpecCaptureSink.put_samples`` does."""

    def __init__(
        self,
        master_uri: str,
        *,
        aux_layer_ids: Sequence[int] | None = None,
        segment: str = "64MiB",
    ) -> None:
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids else None  # server args
        import mooncake.store as binding

        from dataflow.store.mooncake_settings import settings_from_uri

        settings = settings_from_uri(master_uri, {"segment": segment, "buffer": "16MiB"})
        self._store = binding.MooncakeDistributedStore()
        rc = self._store.setup(*settings.setup_args())
        if rc is not None and int(rc) != 0:
            raise RuntimeError(f"spec-capture mooncake setup failed (status {rc})")
        self._config = binding.ReplicateConfig()
        self._config.replica_num = 1
        self._config.with_hard_pin = True

    @staticmethod
    def key(store_id: str, sample_id: str, gen: int, name: str) -> str:
        """``SpecCaptureSink._tkey``."""
        return f"{store_id}/{sample_id}/g{gen}/{name}"

    def put_samples(
        self, samples: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[dict[str, Any]]:
        """``samples``: ``(spec, {name: tensor})`` pairs, ``spec`` the request's ``spec_capture``
        dict; returns one result dict per sample (what ``meta_info["spec_capture"]`` carries).
        """
        keys: list[str] = []
        tensors: list[Any] = []
        replace_keys: list[str] = []
        results: list[dict[str, Any]] = []
        for spec, named in samples:
            store_id, sample_id = str(spec["store_id"]), str(spec["sample_id"])
            gen = int(spec.get("gen", 1))
            feats: dict[str, dict[str, Any]] = {}
            for name, tensor in named.items():
                tensor = tensor.detach().to("cpu").contiguous()
                key = self.key(store_id, sample_id, gen, name)
                keys.append(key)
                tensors.append(tensor)
                if spec.get("replace"):
                    replace_keys.append(key)
                feats[name] = {
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).replace("torch.", ""),
                }
            results.append(
                {
                    "sample_id": sample_id,
                    "store_id": store_id,
                    "gen": gen,
                    "aux_layer_ids": self.aux_layer_ids,
                    "features": feats,
                }
            )
        if replace_keys:
            self._store.batch_remove(replace_keys, True)
        sizes = [t.element_size() * t.numel() for t in tensors]
        for tensor, nbytes in zip(tensors, sizes, strict=True):
            self._store.register_buffer(tensor.data_ptr(), nbytes)
        try:
            statuses = self._store.batch_put_from(
                keys, [t.data_ptr() for t in tensors], sizes, self._config
            )
        finally:
            for tensor in tensors:
                self._store.unregister_buffer(tensor.data_ptr())
        failed = [(k, s) for k, s in zip(keys, statuses or [], strict=False) if int(s) < 0]
        if failed:
            self._store.batch_remove(keys, True)
            raise RuntimeError(f"spec-capture batch_put_from failed for {failed}")
        return results

    def remove(self, key: str) -> None:
        """Force-remove one key (tests that delete what the server wrote)."""
        self._store.remove(key, True)

    def close(self) -> None:
        """Unmount this writer's segment (its objects die with it)."""
        self._store.close()
