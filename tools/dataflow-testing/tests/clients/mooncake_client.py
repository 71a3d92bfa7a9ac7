"""A Mooncake store client that the harness tests run inside a virtual host.

``put`` stores seeded objects, reads them back, prints a JSON report, then keeps its segment (and
so the objects) alive until a line arrives on stdin. ``get`` reads the same keys and reports.
Each report lists, per key, the length and SHA-256 of what ``get`` returned and whether it equals
the seeded bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys

from mooncake.store import MooncakeDistributedStore

MIB = 1 << 20


def payload(seed: int, index: int, size: int) -> bytes:
    return random.Random(f"{seed}/{index}").randbytes(size)


def report(store: MooncakeDistributedStore, args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for index in range(args.keys):
        got = bytes(store.get(f"{args.prefix}-{index}"))
        rows.append(
            {
                "key": f"{args.prefix}-{index}",
                "length": len(got),
                "sha256": hashlib.sha256(got).hexdigest(),
                "equal": got == payload(args.seed, index, args.size),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("put", "get"))
    parser.add_argument("--local", required=True)
    parser.add_argument("--metadata", required=True)
    parser.add_argument("--master", required=True)
    parser.add_argument("--keys", type=int, default=3)
    parser.add_argument("--size", type=int, default=2 * MIB)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="obj")
    args = parser.parse_args()

    store = MooncakeDistributedStore()
    rc = store.setup(args.local, args.metadata, 64 * MIB, 16 * MIB, "tcp", "", args.master)
    if rc != 0:
        print(json.dumps({"role": args.role, "setup": rc}), flush=True)
        return 2
    put_codes = []
    if args.role == "put":
        for index in range(args.keys):
            put_codes.append(
                store.put(f"{args.prefix}-{index}", payload(args.seed, index, args.size))
            )
    print(
        json.dumps({"role": args.role, "setup": rc, "put": put_codes, "got": report(store, args)}),
        flush=True,
    )
    if args.role == "put":
        sys.stdin.readline()  # keep the segment holding the objects until the test is done
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
