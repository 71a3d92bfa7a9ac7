"""A ``dataflow.store`` client that the harness tests run inside a virtual host.

``put URI``: stores one seeded sample, prints its ref (one JSON line), keeps the store open until
a line arrives on stdin. ``get URI``: reads a ref from stdin, fetches the sample, prints whether
every tensor equals the seeded one, releases it.
"""

from __future__ import annotations

import json
import sys

import torch

from dataflow.contracts import SampleRef
from dataflow.contracts.codec import dumps, loads
from dataflow.store.factory import open_store


def sample() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return {
        "hidden": torch.randn(512, 1024, generator=generator),  # 2 MiB of float32
        "input_ids": torch.randint(0, 32000, (512,), generator=generator),
    }


def main() -> int:
    role, uri = sys.argv[1], sys.argv[2]
    store = open_store(uri)
    try:
        if role == "put":
            print(dumps(store.put("sample-0", sample())), flush=True)
            sys.stdin.readline()  # the consumer reads from this process's segment meanwhile
        else:
            ref = loads(sys.stdin.readline(), SampleRef)
            tensors, handle = store.get(ref)
            expected = sample()
            equal = {name: bool(torch.equal(tensors[name], expected[name])) for name in expected}
            store.release(handle)
            print(json.dumps({"equal": equal, "names": sorted(tensors)}), flush=True)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
