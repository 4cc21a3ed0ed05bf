"""Training draws vs evaluation weights, per router rule, at the start, middle and floor of the default
temperature schedule (issue 21): how far the mean training weights are from the evaluation weights, and how
large the router's expected gradient is next to the evaluation gradient.

    python jobs/router_draws.py --out benchmarks/router_draws.json                     # the maths only (~1 min)
    python jobs/router_draws.py --bank BANK.safetensors --data-dir ../shared/data      # + the real MiniLM

Part 1, the rules alone (`crosspt.method.composition.train_weights` / `eval_weights`), per logits case:
- gap: max over candidates of |mean of `--draws` training draws - evaluation weight| (its Monte-Carlo
  standard error beside it);
- E max w: the mean largest training weight of a draw (1 = every draw a one-hot pick);
- |E grad| / |eval grad|: for a loss linear in the weights, `g . w` with `g` ~ N(0, I), the norm of the mean
  router gradient over the draws over the norm of the evaluation weights' gradient (median over `--losses`
  g's); 1 = the expected gradient is as large as at evaluation;
- E|grad| / |eval grad|: the mean per-draw gradient norm over the same (the spread a single step sees).

Part 2 (with `--bank`): the same two gradient ratios on the real loss, CrossPT cat on the frozen MiniLM: one
batch of RTE training rows, the bank's sources (RTE's own task left out) + a private prompt, equal router
logits (every router's start), the loss's gradient w.r.t. the router logits averaged over `--model-draws`
training draws, against the gradient with the evaluation weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crosspt.config.schema import load_config  # noqa: E402
from crosspt.method import composition as C  # noqa: E402

RULES = [n.value for n in C.Normalization]
# (name, logits, top_k): the example, every router's start (5 sources + private, equal), top-k
CASES = [("logits (2, 0, 0, 0, 0)", [2.0, 0.0, 0.0, 0.0, 0.0], None),
         ("6 equal logits", [0.0] * 6, None),
         ("logits (2, 0, 0, 0, 0), top_k 2", [2.0, 0.0, 0.0, 0.0, 0.0], 2),
         ("logits (1, 0, -1, 0.5, 2), top_k 3", [1.0, 0.0, -1.0, 0.5, 2.0], 3)]


def default_temperatures() -> dict[str, float]:
    """tau at the start, middle (half the planned steps) and floor of the default config's schedule."""
    t = load_config(None, {}).prompt.temperature
    return {where: C.scheduled_temperature(t.schedule, start=t.start, floor=t.floor, rate=t.rate, step=0, progress=p)
            for where, p in (("start", 0.0), ("middle", 0.5), ("floor", 1.0))}


def rule_stats(rule: str, logits: list[float], top_k: int | None, tau: float, draws: int, losses: int,
               seed: int) -> dict:
    """Part 1's numbers for one rule, logits case and temperature."""
    torch.manual_seed(seed)
    base = torch.tensor(logits)
    # one leaf row per draw: row j of a gradient w.r.t. it is draw j's gradient (every rule is row-wise)
    rows = base.repeat(draws, 1).requires_grad_(True)
    w = C.train_weights(rows, tau, top_k, rule)                                  # [draws, n]
    ev_leaf = base.clone().requires_grad_(True)
    ev = C.eval_weights(ev_leaf[None], top_k, rule)[0]                           # [n]
    wd = w.detach()
    gap = (wd.mean(0) - ev.detach()).abs()
    i = int(gap.argmax())
    out = {"gap": float(gap[i]), "gap_se": float(wd[:, i].std() / draws ** 0.5),
           "e_max_w": float(wd.max(-1).values.mean()), "draw_sd": float(wd.std(0).mean()),
           "train_mean": wd.mean(0).tolist(),
           "eval": ev.detach().tolist()}
    mean_ratio, spread_ratio, kept_ratio = [], [], []
    kept = ev.detach() > 0                      # what evaluation keeps: its gradient is 0 on the others
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(losses):
        g = torch.randn(len(logits), generator=gen)
        (eval_grad,) = torch.autograd.grad(ev @ g, ev_leaf, retain_graph=True)
        (per_draw,) = torch.autograd.grad((w @ g).sum(), rows, retain_graph=True)     # [draws, n]
        norm = float(eval_grad.norm())
        if norm < 1e-8:
            continue
        mean_ratio.append(float(per_draw.mean(0).norm()) / norm)
        kept_ratio.append(float(per_draw.mean(0)[kept].norm()) / float(eval_grad[kept].norm()))
        spread_ratio.append(float(per_draw.norm(dim=-1).mean()) / norm)
    out["grad_mean_ratio"] = statistics.median(mean_ratio) if mean_ratio else None
    out["grad_spread_ratio"] = statistics.median(spread_ratio) if spread_ratio else None
    out["grad_kept_ratio"] = statistics.median(kept_ratio) if kept_ratio else None
    return out


def model_stats(args, temps: dict[str, float]) -> dict:
    """Part 2: the router-logit gradient of the real loss, CrossPT cat on MiniLM, per rule and temperature."""
    from crosspt.backbones.loader import load_for_config
    from crosspt.bench.harness import leave_one_out_bank
    from crosspt.run.artifacts import load_bank
    from crosspt.run.inputs import prepare_data
    from crosspt.run.model import build_model

    cfg = load_config(None, {"tasks": ["rte"], "backbone.name": "minilm", "backbone.max_length": 64,
                             "data.data_dir": args.data_dir, "data.shots": 16, "prompt.source_len": 8,
                             "prompt.private_len": 8, "prompt.n_sources": 0, "prompt.init": "vocab"})
    tasks, splits = prepare_data(cfg)
    backbone = load_for_config(cfg, tasks)
    bank, meta = load_bank(args.bank, backbone="minilm", source_len=8)
    src, names = leave_one_out_bank(bank, meta, "rte")
    batch = backbone.collate(list(splits["rte"]["train"])[: args.batch], train=True)
    out: dict = {"sources": names, "batch": args.batch, "draws": args.model_draws}
    for rule in ("dirichlet", "noisy_topk"):
        c = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"n_sources": len(names),
                                                                          "normalization": rule})})
        torch.manual_seed(0)
        model = build_model(c, tasks, bank=src, backbone=backbone)
        logits = model.prompt.router.logits

        def grad(training: bool, tau: float) -> torch.Tensor:
            """d loss / d router logits `[n_cand]` for one forward (a training draw at tau, or evaluation)."""
            model.prompt.train(training)
            model.prompt.spec = dataclasses.replace(model.prompt.spec, temp_start=tau, temp_floor=tau)
            logits.grad = None
            model(batch).backward()
            return logits.grad[0].clone()

        eval_grad = grad(False, 1.0)
        rows = {}
        for where, tau in temps.items():
            torch.manual_seed(1)
            gs = torch.stack([grad(True, tau) for _ in range(args.model_draws)])
            rows[where] = {"tau": tau, "eval_grad_norm": float(eval_grad.norm()),
                           "mean_grad_norm": float(gs.mean(0).norm()),
                           # the Monte-Carlo standard error of the mean gradient (as a vector norm)
                           "mean_grad_se": float((gs.var(0).sum() / len(gs)) ** 0.5),
                           "per_draw_grad_norm": float(gs.norm(dim=-1).mean()),
                           "mean_over_eval": float(gs.mean(0).norm() / eval_grad.norm()),
                           "cosine_mean_eval": float(torch.nn.functional.cosine_similarity(gs.mean(0), eval_grad,
                                                                                           dim=0))}
        out[rule] = rows
    return out


def table(res: dict) -> str:
    temps = res["temperatures"]
    at = [f"{w} (tau {t:.3g})" for w, t in temps.items()]

    def f(v):
        return "–" if v is None else f"{v:.3f}"

    def rows(cols):
        out = []
        for case in res["cases"]:
            for rule in RULES:
                r = case["rules"][rule]
                out.append(f"| {case['name']} | {rule} | " + " | ".join(c(r[w]) for c in cols for w in temps) + " |")
        return out

    lines = ["Mean training weights vs evaluation weights: max |E[w_train] - w_eval| over the candidates "
             f"({res['draws']} draws; ± its Monte-Carlo standard error), the mean largest weight of a draw, and the "
             "mean per-candidate sd of a draw's weights:", "",
             "| case | rule | " + " | ".join(f"gap, {a}" for a in at) + " | " + " | ".join(f"E max w, {w}" for w in temps)
             + " | " + " | ".join(f"sd of a weight, {w}" for w in temps) + " |",
             "|---" * (2 + 3 * len(temps)) + "|"]
    lines += rows([lambda r: f"{r['gap']:.3f} ± {r['gap_se']:.3f}", lambda r: f(r["e_max_w"]), lambda r: f(r["draw_sd"])])
    lines += ["", f"Router gradients of a loss linear in the weights (median over {res['losses']} random losses): "
              "the mean gradient over the draws, over the evaluation gradient (all logits, and the logits "
              "evaluation keeps); the mean per-draw gradient norm over the evaluation gradient's:", "",
              "| case | rule | " + " | ".join(f"\\|E grad\\| / \\|eval grad\\|, {w}" for w in temps) + " | "
              + " | ".join(f"same, kept logits, {w}" for w in temps) + " | "
              + " | ".join(f"E\\|grad\\| / \\|eval grad\\|, {w}" for w in temps) + " |",
              "|---" * (2 + 3 * len(temps)) + "|"]
    lines += rows([lambda r: f(r["grad_mean_ratio"]), lambda r: f(r["grad_kept_ratio"]), lambda r: f(r["grad_spread_ratio"])])
    m = res.get("model")
    if m:
        lines += ["", f"Real loss, CrossPT cat on MiniLM (RTE, one batch of {m['batch']} training rows, sources "
                  f"{m['sources']} + private, equal logits), router-logit gradient over {m['draws']} training draws:",
                  "", "| rule | tau | \\|eval grad\\| | \\|mean train grad\\| (± se) | mean / eval | E\\|per-draw grad\\| | "
                  "cosine(mean, eval) |", "|---|---|---|---|---|---|---|"]
        for rule in ("noisy_topk", "dirichlet"):
            for where, r in m[rule].items():
                lines.append(f"| {rule} | {where} {r['tau']:.3g} | {r['eval_grad_norm']:.4f} | "
                             f"{r['mean_grad_norm']:.4f} ± {r['mean_grad_se']:.4f} | "
                             f"{r['mean_over_eval']:.3f} | {r['per_draw_grad_norm']:.4f} | {r['cosine_mean_eval']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=50000, help="training draws per rule, case and temperature")
    p.add_argument("--losses", type=int, default=32, help="random linear losses for the gradient ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank", help="a source bank (safetensors) for part 2 (the real loss on MiniLM)")
    p.add_argument("--data-dir")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model-draws", type=int, default=64)
    p.add_argument("--out", default="benchmarks/router_draws.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    temps = default_temperatures()
    res = {"temperatures": temps, "draws": args.draws, "losses": args.losses, "seed": args.seed, "cases": []}
    for name, logits, top_k in CASES:
        case = {"name": name, "logits": logits, "top_k": top_k, "rules": {}}
        for rule in RULES:
            case["rules"][rule] = {w: rule_stats(rule, logits, top_k, tau, args.draws, args.losses, args.seed)
                                   for w, tau in temps.items()}
        res["cases"].append(case)
        print(f"{name}: done ({time.time() - t0:.0f} s)", flush=True)
    if args.bank:
        res["model"] = model_stats(args, temps)
    res["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
