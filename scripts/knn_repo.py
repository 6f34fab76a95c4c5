"""Experiment (issue #15): a kNN-LM over the user's repository, mixed into single-line completion.

A datastore of the repository: every token position of every Python file of the package, run
left to right through the model in windows, keyed by the final hidden state (the head's input)
and valued by the next token (Khandelwal et al., 2020, "Generalization through Memorization").
At each greedy step of a completion, the K nearest keys (the edited file's own entries left out)
give p_knn, and the step picks from (1 - lam) p_model + lam p_knn. Unlike an n-gram cache the
lookup is by the model's own reading of the context, not by the last few tokens.

    python scripts/knn_repo.py ROOT[,ROOT...] [--limit 60] [--lams 0,0.2,0.4] [--taus 1]

Prints exact match / edit similarity of the product's completions (no repository stubs) on the
``repo-fim`` suite's lines of ROOT, for each setting; lam 0 is the product as it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


class Store:
    """Keys [N, D] float32, next tokens [N], file ids [N] of one repository."""

    def __init__(self, model, tok, root: Path, window: int = 1024, keep_from: int = 256):
        from assistant.repo import RepoIndex

        idx = RepoIndex(root)
        self.files = {rel: i for i, rel in enumerate(idx.files())}
        keys, vals, fids = [], [], []
        captured = []
        hook = model.norm.register_forward_hook(lambda m, a, out: captured.append(out))
        stride = window - keep_from
        try:
            with torch.inference_mode():
                for rel, fi in self.files.items():
                    text = idx._read(rel)
                    if not text:
                        continue
                    ids = tok.encode(text) + [tok.eos_id]
                    for a in range(0, max(1, len(ids) - 1), stride):
                        x = ids[a:a + window]
                        if len(x) < 2:
                            break
                        captured.clear()
                        model(torch.tensor([x[:-1]]))
                        h = captured[-1][0]  # [T-1, D]: position t predicts x[t + 1]
                        lo = 0 if a == 0 else keep_from
                        keys.append(h[lo:].float())
                        vals.append(torch.tensor(x[1 + lo:]))
                        fids.append(torch.full((h.shape[0] - lo,), fi))
                        if a + window >= len(ids):
                            break
        finally:
            hook.remove()
        self.keys = torch.cat(keys)
        self.vals = torch.cat(vals)
        self.fids = torch.cat(fids)
        self.knorm = (self.keys * self.keys).sum(-1)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def dist(self, q_BD: torch.Tensor, k: int, exclude: int | None):
        """(squared distances [B, k], next tokens [B, k]) of the k nearest keys."""
        if getattr(self, "proj", None) is not None:
            q_BD = (q_BD - self.mean) @ self.proj
        d = self.knorm[None] - 2 * q_BD @ self.keys.T + (q_BD * q_BD).sum(-1, keepdim=True)
        if exclude is not None:
            d[:, self.fids == exclude] = float("inf")
        top, i = d.topk(k, dim=-1, largest=False)
        return top, self.vals[i]


class ProductStore:
    """The product's memory (assistant.memory.RepoMemory) behind the interface of ``Store``."""

    def __init__(self, mem):
        self.mem, self.mean, self.proj = mem, mem.mean, mem.proj
        self.files = {rel: rel for rel in mem.file_ids}

    def __len__(self) -> int:
        return self.mem.entries

    def dist(self, q_BD, k, exclude):
        d, v, _ = self.mem.nearest(q_BD, exclude, k)
        return d, v

    @staticmethod
    def load(model, tok, root: Path, cache: Path) -> ProductStore:
        from assistant.memory import RepoMemory

        if cache.exists():  # the blocks as read before (the experiment's cache)
            mem = RepoMemory.__new__(RepoMemory)
            mem.model, mem.tok, mem.root, mem.complete, mem._fixed = model, tok, root.resolve(), True, False
            mem.centroids, mem._assign = None, {}
            mem._blocks = torch.load(cache)
            mem._stack()
        else:
            mem = RepoMemory(model, tok, root)
            torch.save(mem._blocks, cache)
        return ProductStore(mem)


class KnnMix:
    """Wraps ``model.forward``: the last position's logits become log((1-lam) p + lam p_knn)."""

    def __init__(self, model):
        self.model, self.store, self.lam, self.tau, self.k, self.exclude = model, None, 0.0, 1.0, 32, None
        self.captured: list = []
        model.norm.register_forward_hook(lambda m, a, out: self.captured.append(out))
        self.orig = model.forward
        model.forward = self.forward

    def forward(self, *a, **kw):
        self.captured.clear()
        logits = self.orig(*a, **kw)
        if self.store is None or self.lam <= 0 or not self.captured:
            return logits
        h = self.captured[-1][:, -1].float()  # [B, D] the last position's head input
        d, v = self.store.dist(h, self.k, self.exclude)
        scale = self.tau * d[:, :1].clamp_min(1e-6)  # distances relative to the nearest one
        w = torch.softmax(-d / scale, dim=-1)
        V = logits.shape[-1]
        p_knn = torch.zeros(h.shape[0], V).scatter_add_(1, v.clamp_max(V - 1), w)
        p = (1 - self.lam) * logits[:, -1].softmax(-1) + self.lam * p_knn
        out = logits.clone()
        out[:, -1] = p.clamp_min(1e-30).log()
        return out


def teacher(mix, tok, engine, stores, reqs, args) -> int:
    """Per token of the reference lines (teacher forcing after the product's prompt): top-1
    accuracy and mean negative log-likelihood of the mixture, for each (lam, tau); and the share of
    lines whose every token is the mixture's top-1 (greedy would reproduce the line)."""
    from assistant.tasks import make_plan

    lams = [float(x) for x in args.lams.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    stats = {(lam, tau): [0, 0.0, 0] for lam in lams for tau in taus}  # correct tokens, nll, whole lines
    ntok = 0
    rows = []
    model = mix.model
    captured = []
    hook = model.norm.register_forward_hook(lambda m, a, out: captured.append(out))
    for it, req, ref in reqs:
        plan = make_plan(engine, req)
        target = tok.encode(plan.heal + ref + "\n")
        ids = plan.prompt_ids + target
        captured.clear()
        with torch.inference_mode():
            logits = mix.orig(torch.tensor([ids[:-1]]))[0, len(plan.prompt_ids) - 1:]
        h = captured[-1][0, len(plan.prompt_ids) - 1:].float()
        y = torch.tensor(target)
        st = stores[it["root"]]
        d, v = st.dist(h, args.k, st.files.get(it["path"]))
        p_model = logits.softmax(-1)
        ntok += len(target)
        if args.buckets:  # (nearest distance relative to |q|^2, kNN top-1 right, model top-1 right)
            w1 = torch.softmax(-d / (0.1 * d[:, :1].clamp_min(1e-6)), dim=-1)
            pk = torch.zeros_like(p_model).scatter_add_(1, v.clamp_max(p_model.shape[-1] - 1), w1)
            hq = h if getattr(st, "proj", None) is None else (h - st.mean) @ st.proj
            rel = d[:, 0] / (hq * hq).sum(-1)
            rows.extend(zip(rel.tolist(), (pk.argmax(-1) == y).tolist(), (p_model.argmax(-1) == y).tolist()))
        for tau in taus:
            w = torch.softmax(-d / (tau * d[:, :1].clamp_min(1e-6)), dim=-1)
            p_knn = torch.zeros_like(p_model).scatter_add_(1, v.clamp_max(p_model.shape[-1] - 1), w)
            hq = h if getattr(st, "proj", None) is None else (h - st.mean) @ st.proj
            rel = (d[:, :1] / (hq * hq).sum(-1, keepdim=True)).clamp_min(0)
            for lam in lams:
                lam_t = lam * torch.exp(-rel / args.r0) if args.r0 > 0 else lam  # adaptive: near -> trusted
                p = (1 - lam_t) * p_model + lam_t * p_knn
                ok = p.argmax(-1) == y
                s = stats[(lam, tau)]
                s[0] += int(ok.sum())
                s[1] += float(-p.gather(1, y[:, None]).clamp_min(1e-30).log().sum())
                s[2] += bool(ok.all())
    hook.remove()
    if args.buckets:
        rows.sort()
        q = len(rows) // args.buckets
        for b in range(args.buckets):
            part = rows[b * q:(b + 1) * q if b < args.buckets - 1 else len(rows)]
            print(f"relative nearest distance {part[0][0]:.3f}-{part[-1][0]:.3f}: kNN top-1 "
                  f"{100 * sum(r[1] for r in part) / len(part):.0f}%, model top-1 {100 * sum(r[2] for r in part) / len(part):.0f}%")
    for (lam, tau), (c, nll, lines) in stats.items():
        print(f"lam {lam:g} tau {tau:g} k {args.k}: token top-1 {100 * c / ntok:.1f}% nll {nll / ntok:.3f} "
              f"lines all top-1 {100 * lines / len(reqs):.1f}% ({len(reqs)} lines, {ntok} tokens)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lams", default="0,0.2,0.4")
    ap.add_argument("--taus", default="1")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r0", type=float, default=0.0,
                    help="adaptive: lam x exp(-r / r0), r = nearest distance / |q|^2 (0: a fixed lam)")
    ap.add_argument("--product-memory", action="store_true", help="the stores: assistant.memory.RepoMemory")
    ap.add_argument("--buckets", type=int, default=0, help="teacher: accuracy by nearest distance, in N buckets")
    ap.add_argument("--pca", type=int, default=0, help="project keys to this many dimensions")
    ap.add_argument("--stubs", action="store_true", help="also the repository stubs in the prompt")
    ap.add_argument("--teacher", action="store_true",
                    help="token-level: the reference line's tokens after the product's prompt, every setting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from assistant.config import Settings
    from assistant.engine import Engine
    from assistant.evaluate import _text, completion_request, edit_similarity, exact_match, repo_fim_items
    from assistant.tasks import iter_batch
    from model.checkpoint import load_model

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    settings = Settings().for_face("review")
    engine = Engine.from_loaded(loaded, **settings.engine_options())
    import assistant.tasks

    assistant.tasks.REPO_MEMORY = False  # this script mixes its own memory in (KnnMix)
    mix = KnnMix(model)
    roots = [Path(r) for r in args.roots.split(",") if r]
    items = repo_fim_items(roots, args.limit, args.seed)
    stores = {}
    for r in roots:
        t = time.monotonic()
        cache = Path(f"/tmp/knn_store_{r.name}.pt")  # built once per package (the experiment's cache)
        if args.product_memory:
            stores[str(r)] = ProductStore.load(model, tok, r, Path(f"/tmp/knn_mem_{r.name}.pt"))
        elif cache.exists():
            stores[str(r)] = torch.load(cache, weights_only=False)
        else:
            stores[str(r)] = Store(model, tok, r)
            torch.save(stores[str(r)], cache)
        print(f"store {r}: {len(stores[str(r)]):,} positions, {len(stores[str(r)].files)} files, "
              f"{time.monotonic() - t:.0f}s", file=sys.stderr)
    reqs = []
    for it in items:
        text = (Path(it["root"]) / it["path"]).read_text(encoding="utf-8")
        req, ref = completion_request(text.split("\n"), it["line"], path=str(Path(it["root"]) / it["path"]))
        if args.stubs:  # the repository's signatures in the prompt too (TaskRequest.repo)
            req.repo, req.recent = it["root"], []
        reqs.append((it, req, ref))
    if args.pca:  # keys and queries projected on the store's top principal components
        for st in stores.values():
            mean = st.keys.mean(0)
            _, _, v = torch.linalg.svd(st.keys[::4] - mean, full_matrices=False)
            st.proj = v[:args.pca].T.contiguous()
            st.mean = mean
            st.keys = (st.keys - mean) @ st.proj
            st.knorm = (st.keys * st.keys).sum(-1)
    if args.teacher:
        return teacher(mix, tok, engine, stores, reqs, args)
    settings_list = []
    for lam in map(float, args.lams.split(",")):
        for tau in map(float, args.taus.split(",") if lam > 0 else ["1"]):  # lam 0: the product, once
            settings_list.append((lam, tau))
    for lam, tau in settings_list:
        mix.lam, mix.tau, mix.k = lam, tau, args.k
        t = time.monotonic()
        em = es = 0.0
        outs = []
        for it, req, ref in reqs:
            st = stores[it["root"]]
            mix.store, mix.exclude = st, st.files.get(it["path"])
            res = [r for _, r in iter_batch(engine, [req], batch_size=1)][0]
            p = _text(res) or ""
            em += exact_match(p, ref)
            es += edit_similarity(p, ref)
            outs.append((ref, p))
        n = len(reqs)
        print(f"lam {lam:g} tau {tau:g} k {args.k}: exact match {100 * em / n:.1f}% edit sim {es / n:.3f} "
              f"({n} lines, {time.monotonic() - t:.0f}s)", flush=True)
        for ref, p in outs[:8]:
            print(f"    ref {ref!r:60.60} got {p!r:60.60}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
