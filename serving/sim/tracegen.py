"""Write a scenario's arrivals as a Mooncake JSONL trace.

Each line: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one
per 512-token block, the last one partial), `region`, `session_id`, `tenant`.
Block ids follow Mooncake's convention: equal ids mean equal content up to
the end of that block (the prefix included), numbered in order of first use;
a partial last block gets a fresh id. Replaying the written trace gives the
same prefix sharing, at 512-token granularity, as the generators did.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.sim.content import Hasher
from serving.sim.scenario import Scenario
from serving.sim.workload import TRACE_BLOCK, arrivals


def write_trace(sc: Scenario, path: Path) -> int:
    hasher = Hasher(TRACE_BLOCK)
    ids: dict[int, int] = {}
    fresh = [0]

    def new_id() -> int:
        fresh[0] += 1
        return fresh[0] - 1

    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a in arrivals(sc):
            full = hasher.hashes(a.segments, a.prompt_len, a.model, a.tenant)
            row = []
            for h in full:
                i = ids.get(h)
                if i is None:
                    i = ids[h] = new_id()
                row.append(i)
            if a.prompt_len % TRACE_BLOCK:
                row.append(new_id())
            rec = {"timestamp": int(round(a.t * 1000)), "input_length": a.prompt_len,
                   "output_length": a.output_len, "hash_ids": row, "region": a.region}
            if a.session_id:
                rec["session_id"] = a.session_id
            if a.tenant:
                rec["tenant"] = a.tenant
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n
