"""A/B: MoE expert counts by torch.bincount (the old code: two host syncs per MoE layer) vs
index_add_ (now, ``MoE._expert_counts``), on the training step of ``python -m model.bench
--device cuda``; two rounds, alternated in one process.

    PYTHONPATH=$PWD python scripts/moe_counts_ab.py --device cuda --presets small --steps 10
"""

import sys

import torch

from model import bench
from model.moe import MoE

new_counts = MoE._expert_counts


def old_counts(self, experts_TK):
    return torch.bincount(experts_TK.reshape(-1), minlength=self.n_experts).float()


for rnd in range(2):
    for name, fn in (("bincount (old)", old_counts), ("index_add (new)", new_counts)):
        MoE._expert_counts = fn
        print(f"== round {rnd} {name}", flush=True)
        bench.main(sys.argv[1:])
