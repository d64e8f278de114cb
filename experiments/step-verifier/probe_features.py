"""Is the signal in the frozen policy? (RESULTS.md, "head-only and the policy's own knowledge")

For N_TRAIN training pairs and all eval pairs, one forward of the frozen tiny policy per side:
- linear probes: Bradley-Terry on h(chosen) - h(rejected) at the scored last token, each layer's hidden state
  (layer 0 = the token embedding, the same on both sides; layer 4 = the last, what a head reads), trained on
  the training pairs (features scaled per dimension, L2 1e-3, 400 gradient steps), accuracy on train and eval. Formats:
  eos = the reward model's own input (chat template, last token EOS); noeos = the same without EOS (last token
  = the step's last character); restate = the last step's line repeated up to its "= " (or "Answer: "), no EOS.
- the policy's own ranking on the eval pairs: summed log-prob of each side, and the log-prob of the first token
  where the sides differ.
Usage: python experiments/step-verifier/probe_features.py N_TRAIN  (writes runs/step-verifier/probe-N.json)"""
import json
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.judges.reward_model import encode
from pipeline.train.data import read_table

torch.set_num_threads(1)
t0 = time.time()
tok = AutoTokenizer.from_pretrained("data/tiny-policy")
lm = AutoModelForCausalLM.from_pretrained("data/tiny-policy", dtype=torch.float32).eval()
EOS = tok.eos_token_id
def rows(path, n):
    t = read_table(path)
    if n and n < t.num_rows:
        t = t.take(np.random.default_rng(0).permutation(t.num_rows)[:n])
    return t.select(["prompt", "chosen", "rejected", "pair_type"]).to_pylist()
def restate(resp):
    last = resp.split("\n")[-1]
    return resp + "\n" + (last[:last.rindex("=") + 1] + " " if "=" in last else last[:last.index(":") + 1] + " ")
FORMATS = {"eos": lambda p, r: encode(tok, p, r),
           "noeos": lambda p, r: encode(tok, p, r)[:-1],
           "restate": lambda p, r: encode(tok, p, restate(r))[:-1]}
@torch.no_grad()
def feats(seqs):
    out_h, out_lp = [], []
    for s in range(0, len(seqs), 32):
        b = seqs[s:s + 32]; w = max(map(len, b))
        ids = torch.zeros((len(b), w), dtype=torch.long); m = torch.zeros_like(ids)
        for i, q in enumerate(b): ids[i, :len(q)] = torch.tensor(q); m[i, :len(q)] = 1
        o = lm(input_ids=ids, attention_mask=m, output_hidden_states=True)
        lp = torch.log_softmax(o.logits, -1)
        for i, q in enumerate(b):
            L = len(q) - 1
            out_h.append(torch.stack([h[i, L] for h in o.hidden_states]).numpy())
            out_lp.append(lp[i, torch.arange(L), torch.tensor(q[1:])].numpy())  # lp of token t+1
    return out_h, out_lp
def probe(Xtr, Xev, l2=1e-3, iters=400):
    sd = Xtr.std(0) + 1e-6
    A, B = Xtr / sd, Xev / sd  # differences: no centring (the sign carries the label)
    w = np.zeros(A.shape[1]); lr = 0.5
    for _ in range(iters):
        z = A @ w; g = -(A * (1 / (1 + np.exp(z)))[:, None]).mean(0) + l2 * w
        w -= lr * g
    return float(np.mean(A @ w > 0)), float(np.mean(B @ w > 0))
n = int(sys.argv[1])
tr, ev = rows("runs/step-verifier/train-run/tree-search", n), rows("runs/step-verifier/eval-run/tree-search", 0)
res = {"train_pairs": len(tr), "eval_pairs": len(ev)}
for fname, f in FORMATS.items():
    D = {}
    for split, rs in (("tr", tr), ("ev", ev)):
        sc = [f(r["prompt"], r["chosen"]) for r in rs]; sr = [f(r["prompt"], r["rejected"]) for r in rs]
        hc, lc = feats(sc); hr, lr_ = feats(sr)
        D[split] = (np.stack(hc) - np.stack(hr), sc, sr, lc, lr_)
    for layer in range(D["tr"][0].shape[1]):
        res[f"{fname}/probe_layer{layer}"] = probe(D["tr"][0][:, layer], D["ev"][0][:, layer])
    if fname == "eos":
        types = np.array([r["pair_type"] for r in ev])
        _, sc, sr, lc, lr_ = D["ev"]
        summ = np.array([a.sum() - b.sum() for a, b in zip(lc, lr_)])
        first = []
        for a, b, la, lb in zip(sc, sr, lc, lr_):
            d = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            first.append(la[d - 1] - lb[d - 1])
        first = np.array(first)
        for k, v in (("logprob_sum", summ), ("logprob_first_diff", first)):
            res[k] = {t: float(np.mean(v[types == t] > 0)) for t in ("first_wrong_step", "terminal")}
            res[k]["all"] = float(np.mean(v > 0))
    print(fname, round(time.time() - t0), flush=True)
res["wall_s"] = round(time.time() - t0)
print(json.dumps(res, indent=0))
json.dump(res, open(f"runs/step-verifier/probe-{n}.json", "w"))
