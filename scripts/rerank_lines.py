"""The experiment behind assistant.tasks' reranking of beam completions (issue #15): for the eval's
held-out FIM lines, the product's single-line completion prompts, every finished beam of the
shipped model (width W), each scored by the plain left-to-right log-probability of its line plus
the next 3 lines after up to 384 tokens of the code before it; exact match of the beam score's
pick vs beam score + lambda x that log-probability / 10, and the oracle (any beam right).

    moecoder data corpus $SP/pygls ... --splits 0,0,1 --out /tmp/heldout   # as in docs/model-card.md
    PYTHONPATH=$PWD python scripts/rerank_lines.py SEED N W [CTX]  # e.g. 1 400 5; rows to /tmp/rr/

It runs the model's beam search without the product's reranker (a plain SamplingParams) and
records the finished beams through SamplingParams.rerank (returning no extra score); a beam's
score is recomputed as the summed log-probability of its tokens after the prompt."""
import json
import sys
import time
from pathlib import Path

import torch

import model.generate as G
from assistant import tasks
from assistant.engine import Engine
from assistant.evaluate import completion_request, exact_match, fim_items, heldout_sources
from model.checkpoint import load_model

seed, n, W = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CTX = int(sys.argv[4]) if len(sys.argv) > 4 else 384  # tokens of code before the line
torch.set_num_threads(2)
loaded = load_model(None)
model, tok = loaded.model, loaded.tokenizer
eng = Engine.from_loaded(loaded, completion_beams=W)
sources, _ = heldout_sources("/tmp/heldout", n, seed, tok)
items = fim_items(sources, n, seed, tok, 2048, 64)
captured = {}


def capture(_model, answers):  # the finished beams; no extra score (the pick is the beam score's)
    captured["done"] = [list(a) for a in answers]
    return [0.0] * len(answers)


rows = []
t0 = time.time()
Path("/tmp/rr").mkdir(exist_ok=True)
for it in items:
    lines = it["source"].split("\n")
    i = it["line"] - 1
    req, ref = completion_request(lines, i)
    plan = tasks.make_plan(eng, req)
    if plan.beams <= 1:
        continue  # multi-line: greedy in the product
    guard = {**tasks._guard(plan), "rerank": capture}  # the beam score alone, the beams recorded
    params = eng.sampling_params(plan.max_new_tokens, None, stop_strings=plan.stop_strings,
                                 stop_token_ids=plan.stop_token_ids, **guard)
    captured.clear()
    res = G.GenerationResult("")
    with torch.no_grad():
        for _ in G._beam_decode(model, tok, plan.prompt_ids, params, None, res):
            pass
    done = captured.get("done") or []
    cands = []
    ind = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    prefix = "\n".join(lines[:i]) + "\n"
    suffix_head = "\n".join(lines[i + 1 : i + 4])
    pre_ids = tok.encode(prefix)[-CTX:]
    texts, conts = [], []
    for toks in done:
        ans = tok.decode_bytes([t for t in toks if t not in plan.stop_token_ids]).decode("utf-8", "replace")
        texts.append(plan.finish(eng, tasks.Generated("", ans.split("\n")[0], [], "stop")).text)
        conts.append(tok.encode(ind + texts[-1] + "\n" + suffix_head)[:model.cfg.max_seq_len - len(pre_ids)])
    # the line and the lines after it, read left to right after the code before it (the product's scorer)
    lms = G.continuation_logprobs(model, pre_ids, conts) if done else []
    for toks, txt, lm in zip(done, texts, lms):
        score = sum(G.token_logprobs(model, plan.prompt_ids + toks)[-len(toks):])  # the beam's score
        cands.append({"text": txt, "fim": score, "fim_norm": score / len(toks) ** G.BEAM_LENGTH_ALPHA,
                      "ntok": len(toks), "lm": lm})
    rows.append({"ref": ref, "cands": cands})
print(f"{len(rows)} single-line items, {time.time() - t0:.0f}s", file=sys.stderr)
json.dump(rows, open(f"/tmp/rr/rows_s{seed}_n{n}_w{W}_c{CTX}.json", "w"))
def em(pick):
    return sum(exact_match(pick(r["cands"])["text"], r["ref"]) for r in rows if r["cands"]) / len(rows)
print("beam (product pick):", round(em(lambda c: max(c, key=lambda d: d["fim_norm"])), 4))
for lam in (0.25, 0.5, 1.0, 2.0, 4.0, 100.0):
    print(f"lambda {lam}:", round(em(lambda c, lam=lam: max(c, key=lambda d: d["fim_norm"] + lam * d["lm"] / 10)), 4))
print("oracle:", round(sum(any(exact_match(c["text"], r["ref"]) for c in r["cands"]) for r in rows) / len(rows), 4))
