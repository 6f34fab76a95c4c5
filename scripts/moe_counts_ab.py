"""A/B: MoE expert counts by torch.bincount (the old code: two host syncs per MoE layer) vs
index_add_ (now), on the training step of ``python -m model.bench --device cuda``; two rounds.

    PYTHONPATH=$PWD python scripts/moe_counts_ab.py --device cuda --presets small --steps 10
"""
import sys

import torch

from model import bench
from model.moe import MoE

new_record = MoE._record


def old_record(self, logits_TE, experts_TK):
    if experts_TK.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    counts = torch.bincount(experts_TK.reshape(-1), minlength=self.n_experts).float()
    last = {"counts": counts}
    if self.training:
        self.counts_acc += counts
    if torch.is_grad_enabled() and (self.aux_loss_coef > 0 or self.z_loss_coef > 0):
        if self.score_func == "softmax":
            probs = logits_TE.softmax(-1)
        else:
            s = logits_TE.sigmoid()
            probs = s / s.sum(-1, keepdim=True)
        frac = counts / counts.sum().clamp_min(1)
        last["balance_loss"] = self.n_experts * (frac * probs.mean(0)).sum()
        last["z_loss"] = torch.logsumexp(logits_TE, dim=-1).square().mean()
    self.last = last


for rnd in range(2):
    for name, fn in (("bincount (old)", old_record), ("index_add (new)", new_record)):
        MoE._record = fn
        print(f"== round {rnd} {name}", flush=True)
        bench.main(sys.argv[1:])
