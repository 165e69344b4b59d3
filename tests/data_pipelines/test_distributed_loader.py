"""Two real processes (torch.distributed over gloo) x two DataLoader workers each: every sample once per epoch."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

SCRIPT = """
import json, sys
import torch.distributed as dist
from data_pipelines.loader import build_loader
from dit.config import DataConfig

if __name__ == "__main__":  # loader workers start from a forkserver, which imports this file again
    rank, init, shards, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    cfg = DataConfig(shards=shards, frames=1, height=16, width=16, num_workers=2, shuffle_buffer=8)
    loader = build_loader(cfg, 4, rank=dist.get_rank(), world_size=dist.get_world_size(), seed=7, infinite=False,
                          drop_last=False)
    epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
    loader.close()
    json.dump({"epochs": epochs, "stats": loader.stats.as_dict()}, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()
"""


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(synthetic_shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    init = f"file://{tmp_path / 'rendezvous'}"
    spec = str(Path(synthetic_shards[0]).parent)  # 4 shards: one per (rank, worker)
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, spec, str(tmp_path / f"{r}.json")],
                              cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    every = Counter(f"{i:06d}" for i in range(60))
    for epoch in (0, 1):
        per_rank = [set(res["epochs"][epoch]) for res in results]
        assert not per_rank[0] & per_rank[1]  # no rank reads another rank's samples
        assert Counter(results[0]["epochs"][epoch] + results[1]["epochs"][epoch]) == every  # each exactly once
    assert results[0]["epochs"][0] != results[0]["epochs"][1]  # the order is reshuffled per epoch
    assert sum(res["stats"]["seen"] for res in results) == 120
