"""The router as the method means it: training draws vs evaluation weights per normalisation, top-k in
both, temperature schedules over training progress, ATTEMPT as published, and the router's config keys."""
import math

import pytest
import torch

from crosspt.config.schema import load_config
from crosspt.errors import ConfigError
from crosspt.method import composition as C
from crosspt.method.prompts import CrossPTPrompt, PromptSpec

DRAWS = 4000
# noisy_topk at tau: |E[w_train] - w_eval| = O(tau^2) (composition docstring); at tau = 0.05 it is under
# 1e-3, the Monte-Carlo error of the mean of 4000 draws is under 2e-3: 0.01 leaves room for both only
MEAN_TOL = 0.01
PEAKED = [5.0, -5.0, -5.0, -5.0, -5.0]           # the example: eval gives the top one ~1.00


def _logits(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _prompt(logits: torch.Tensor, top_k: int | None, tau: float, **spec) -> CrossPTPrompt:
    """A one-task prompt whose router holds `logits` `[n_cand]` and whose temperature is `tau` at every
    step (start == floor), whatever the schedule."""
    n = logits.shape[-1]
    m = CrossPTPrompt(PromptSpec(n_tasks=1, dim=4, n_sources=n - 1, source_len=2, private_len=2, top_k=top_k,
                                 temp_start=tau, temp_floor=tau, **spec))
    with torch.no_grad():
        m.router.logits.copy_(logits[None])
    return m


@pytest.mark.parametrize("rows,top_k", [(PEAKED, None), (PEAKED, 2), ([1.0, 0.0, -1.0, 0.5, 2.0], 3),
                                        ([0.3, 0.2, -0.4], None)])
def test_default_training_weights_average_to_evaluation_weights_at_the_floor(rows, top_k):
    """The default rule through the module: the mean training weight at the floor temperature is the
    evaluation weight, and both keep exactly top_k candidates."""
    torch.manual_seed(0)
    m = _prompt(_logits(rows), top_k, tau=0.05)
    ids = torch.zeros(DRAWS, dtype=torch.long)
    _, _, train = m.train()(ids)
    _, _, evalw = m.eval()(ids[:1])
    k = top_k or len(rows)
    assert ((train > 0).sum(-1) == k).all()
    assert int((evalw[0] > 0).sum()) == k
    assert torch.allclose(train.mean(0), evalw[0], atol=MEAN_TOL), (train.mean(0), evalw[0])


def _default_schedule_temperatures() -> dict[str, float]:
    """tau at the start, the middle and the floor of the default config's temperature schedule."""
    t = load_config(None, {}).prompt.temperature
    return {where: C.scheduled_temperature(t.schedule, start=t.start, floor=t.floor, rate=t.rate, step=0,
                                           progress=p) for where, p in (("start", 0.0), ("middle", 0.5),
                                                                         ("floor", 1.0))}


def _default_rule_prompt(logits: torch.Tensor, top_k: int | None, tau: float, **spec) -> CrossPTPrompt:
    """`_prompt` with the default config's normalisation (what a run gets without naming one)."""
    return _prompt(logits, top_k, tau, normalization=load_config(None, {}).prompt.normalization, **spec)


# 20000 draws: the Monte-Carlo sd of a mean weight is under 0.0035 even at tau = 5 (Var(w_i) <= 1/4 / (c + 1),
# c = k / tau >= 1), so 0.02 is > 5 sd, and far below the 0.39 gap of noisy_topk at the start
DEFAULT_DRAWS, DEFAULT_TOL = 20000, 0.02


@pytest.mark.parametrize("where", ["start", "middle", "floor"])
@pytest.mark.parametrize("rows,top_k", [([2.0, 0.0, 0.0, 0.0, 0.0], None), ([2.0, 0.0, 0.0, 0.0, 0.0], 2),
                                        ([1.0, 0.0, -1.0, 0.5, 2.0], 3), ([0.0] * 6, None)])
def test_default_training_weights_average_to_evaluation_weights_at_every_temperature(where, rows, top_k):
    """Issue 21: the default rule's mean training weights are its evaluation weights at the start, the
    middle and the floor of the default schedule (noisy_topk met them only near the floor), with exactly
    top_k candidates in both."""
    tau = _default_schedule_temperatures()[where]
    torch.manual_seed(11)
    m = _default_rule_prompt(_logits(rows), top_k, tau)
    ids = torch.zeros(DEFAULT_DRAWS, dtype=torch.long)
    _, _, train = m.train()(ids)
    _, _, evalw = m.eval()(ids[:1])
    k = top_k or len(rows)
    assert ((train > 0).sum(-1) == k).all() and int((evalw[0] > 0).sum()) == k
    gap = float((train.detach().mean(0) - evalw[0].detach()).abs().max())
    assert gap < DEFAULT_TOL, f"tau {tau:.3f}: mean training {train.mean(0).tolist()} vs eval {evalw[0].tolist()}"


@pytest.mark.parametrize("where", ["start", "middle", "floor"])
def test_default_router_gradient_is_the_evaluation_gradient_on_average(where):
    """For a loss linear in the weights the expected router gradient under the default rule is the
    evaluation gradient at every temperature of the default schedule: it does not vanish at the start
    (noisy_topk's is ~0.16x there)."""
    tau = _default_schedule_temperatures()[where]
    torch.manual_seed(12)
    g = torch.randn(5)
    logits = _logits([2.0, 0.0, 0.0, 0.0, 0.0])
    m = _default_rule_prompt(logits, None, tau)
    _, _, train = m.train()(torch.zeros(DEFAULT_DRAWS, dtype=torch.long))
    (train @ g).mean().backward()
    mean_grad = m.router.logits.grad[0].clone()
    m.router.logits.grad = None
    _, _, evalw = m.eval()(torch.zeros(1, dtype=torch.long))
    (evalw[0] @ g).backward()
    eval_grad = m.router.logits.grad[0]
    ratio = float(mean_grad.norm() / eval_grad.norm())
    assert 0.9 < ratio < 1.1, f"tau {tau:.3f}: |E grad| / |eval grad| = {ratio:.3f}"
    assert float((mean_grad - eval_grad).norm() / eval_grad.norm()) < 0.15


def test_default_rule_breaks_ties_to_the_earlier_candidates_in_both():
    """Equal logits (every task router at the start): training and evaluation keep the same k, the first
    ones (torch.topk alone keeps index 2 of 5 for k = 1)."""
    torch.manual_seed(13)
    for top_k in (1, 2, 3):
        m = _default_rule_prompt(_logits([0.0] * 5), top_k, tau=5.0)
        _, _, train = m.train()(torch.zeros(64, dtype=torch.long))
        _, _, evalw = m.eval()(torch.zeros(1, dtype=torch.long))
        first = torch.arange(5) < top_k
        assert torch.equal(evalw[0] > 0, first) and torch.equal(train > 0, first.expand(64, -1))


def test_dirichlet_is_finite_and_keeps_k_at_extreme_logits():
    """Logit gaps of 60 give kept weights near 1e-26 (Dirichlet concentrations near 0): still exactly k
    non-zero weights, summing to 1, and finite gradients."""
    torch.manual_seed(14)
    logits = _logits([[30.0, -30.0, 0.0, -30.0], [0.0, 0.0, 0.0, 0.0]]).repeat(500, 1).requires_grad_(True)
    for tau in (5.0, 0.1):
        w = C.train_weights(logits, tau, 3, "dirichlet")
        assert ((w > 0).sum(-1) == 3).all() and torch.allclose(w.sum(-1), torch.ones(1000))
        (w * torch.randn(4)).sum().backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def test_dirichlet_dropped_candidate_learns_through_the_dense_gradient_under_wavg():
    """A candidate top-k drops has weight exactly 0 in every training draw, but its logit still gets the
    dense softmax's gradient: when adding it would lower the loss (wavg) it rises into the kept set."""
    torch.manual_seed(15)
    cands = torch.randn(4, 3, 8)                                            # [n_cand, L, d]
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]], requires_grad=True)      # the target, 3, is dropped
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(60):
        kept = C.topk_mask(logits.detach(), 2, stable=True)[0]
        w = C.train_weights(logits.expand(16, -1), 1.0, 2, "dirichlet")     # [16, 4]
        assert bool(kept[3]) or (w[:, 3] == 0).all()
        prompt = torch.einsum("bn,nld->bld", w, cands)
        loss = (prompt - cands[3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool(C.topk_mask(logits.detach(), 2, stable=True)[0, 3]), logits


@pytest.mark.parametrize("normalization", ["dirichlet", "noisy_topk", "reference", "gate_softmax"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_every_rule_keeps_exactly_top_k_in_training_and_evaluation(normalization, top_k):
    torch.manual_seed(1)
    logits = torch.randn(64, 5)
    train = C.train_weights(logits, 0.5, top_k, normalization)
    evalw = C.eval_weights(logits, top_k, normalization)
    k = top_k or 5
    assert ((train > 0).sum(-1) == k).all() and torch.allclose(train.sum(-1), torch.ones(64))
    # gate_softmax is the historical rule: its evaluation ignores top-k (the bug kept for reproduction)
    k_eval = 5 if normalization == "gate_softmax" else k
    assert ((evalw > 0).sum(-1) == k_eval).all() and torch.allclose(evalw.sum(-1), torch.ones(64))


@pytest.mark.parametrize("top_k", [None, 2])
def test_noisy_topk_mean_matches_eval_and_every_draw_converges(top_k):
    torch.manual_seed(2)
    logits = _logits([PEAKED, [1.0, 0.0, -1.0, 0.5, 2.0]])
    evalw = C.eval_weights(logits, top_k, "noisy_topk")
    draws = C.train_weights(logits.repeat(DRAWS, 1), 0.05, top_k, "noisy_topk").view(DRAWS, 2, 5)
    assert torch.allclose(draws.mean(0), evalw, atol=MEAN_TOL)
    # not only the mean: as tau -> 0 every single draw tends to the evaluation weights
    gaps = [float((C.train_weights(logits.repeat(500, 1), tau, top_k, "noisy_topk").view(500, 2, 5)
                   - evalw).abs().max()) for tau in (0.5, 0.05, 0.005)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01


@pytest.mark.parametrize("normalization", ["reference", "gate_softmax"])
def test_gate_rules_cannot_reach_their_evaluation_weights(normalization):
    """The authors' rule and the old one softmax values in (0, 1]: no training weight can exceed
    e / (e + k - 1) at any temperature, while evaluation gives the top candidate ~1 (documented gap)."""
    torch.manual_seed(3)
    logits = _logits([PEAKED]).repeat(DRAWS, 1)
    bound = math.e / (math.e + 4)
    for tau in (5.0, 1.0, 0.01):
        w = C.train_weights(logits, tau, None, normalization)
        assert float(w.max()) <= bound + 1e-6
    assert float(C.eval_weights(logits[:1], None, normalization)[0, 0]) > 0.99


def test_reference_rule_divides_kept_gates_by_their_sum_then_softmaxes():
    torch.manual_seed(4)
    logits = torch.randn(8, 4)
    torch.manual_seed(5)
    w = C.train_weights(logits, 0.7, 2, "reference")
    torch.manual_seed(5)
    gates = C.relaxed_bernoulli_gates(logits, 0.7)
    keep = C.topk_mask(gates, 2)
    kept = gates * keep
    expect = torch.softmax((kept / kept.sum(-1, keepdim=True)).masked_fill(~keep, float("-inf")), -1)
    assert torch.allclose(w, expect, atol=1e-6)
    # the authors' evaluation: top-k of the raw logits, plain softmax over the kept
    top2 = logits.topk(2, dim=-1).indices
    expect_eval = torch.zeros_like(logits).scatter(-1, top2, torch.softmax(logits.gather(-1, top2), -1))
    assert torch.allclose(C.eval_weights(logits, 2, "reference"), expect_eval, atol=1e-6)


def test_collapsed_prompt_uses_evaluation_top_k():
    m = _prompt(_logits([2.0, 1.0, -1.0, 0.0]), top_k=2, tau=0.1, composition="cat")
    prompt, mask, w = m.eval()(torch.tensor([0]))
    collapsed, cmask = m.collapsed(0)
    assert int((w[0] > 0).sum()) == 2 and collapsed.shape == (2 * 2, 4)
    assert torch.allclose(collapsed, prompt[0][mask[0].bool()])


# ---- temperature -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_progress_schedules_go_from_start_to_floor(schedule):
    temps = [C.scheduled_temperature(schedule, start=5.0, floor=0.1, rate=0.0, step=0, progress=p / 10)
             for p in range(11)]
    assert temps[0] == pytest.approx(5.0) and temps[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(temps, temps[1:]))
    mid = C.scheduled_temperature(schedule, start=5.0, floor=0.1, rate=0.0, step=0, progress=0.5)
    assert mid == pytest.approx(math.sqrt(0.5) if schedule == "exp" else 2.55)


def test_prompt_temperature_reaches_the_floor_on_the_planned_last_step():
    m = CrossPTPrompt(PromptSpec(n_tasks=1, dim=4, n_sources=2, source_len=2, private_len=2,
                                 temp_start=5.0, temp_floor=0.1))
    m.plan_steps(32)                  # the smoke trial: the old per-step default gave 4.84 here
    m.set_step(32)
    assert m.temperature == pytest.approx(0.1)
    m.set_step(16)
    assert m.temperature == pytest.approx(math.sqrt(0.5))


def test_the_loop_plans_the_schedule_over_its_steps(tiny_t5_path, data_dir, tmp_path):
    from crosspt.run import loop

    cfg = load_config(None, {"tasks": ["sst2"], "backbone.name": str(tiny_t5_path), "backbone.max_length": 32,
                             "data.data_dir": str(data_dir), "data.shots": 4, "data.max_test": 8,
                             "prompt.private_len": 2, "prompt.n_sources": 2, "prompt.source_len": 2, "prompt.source_bank": "random",
                             "train.epochs": 3, "train.batch_size": 4, "train.patience": None,
                             "train.eval_initial": False})
    result = loop.run_loop(cfg, loop.LocalSession(tmp_path))
    temps = [h["temperature"] for h in result["history"]]
    assert temps[-1] == pytest.approx(0.1)                                 # the floor on the last step
    assert temps[0] == pytest.approx(5.0 * (0.1 / 5.0) ** (1 / 3))        # a third of the way


# ---- ATTEMPT -----------------------------------------------------------------------------------------------
def _attempt(private_len: int = 2, composition: str = "wavg") -> CrossPTPrompt:
    torch.manual_seed(0)
    return CrossPTPrompt(PromptSpec(n_tasks=1, dim=8, n_sources=3, source_len=2, private_len=private_len,
                                    composition=composition, router="attention"))


def test_attempt_router_is_the_published_sub_network():
    r = _attempt().router
    assert r.down.in_features == 8 and r.down.out_features == 100 and r.down.bias is None and r.up.bias is None
    assert r.temperature == pytest.approx(8 * math.e)
    pooled = torch.randn(2, 8)
    keys = torch.randn(2, 4, 8)
    h = torch.nn.functional.layer_norm(r.up(torch.nn.functional.silu(r.down(pooled))), (8,),
                                       r.norm.weight, r.norm.bias)
    assert torch.allclose(r(keys, pooled), torch.einsum("bd,bnd->bn", h, keys) / (8 * math.e), atol=1e-6)


def test_attempt_mixes_by_softmax_and_adds_the_target_prompt():
    m = _attempt()
    x, mask = torch.randn(3, 5, 8), torch.ones(3, 5)
    ids = torch.zeros(3, dtype=torch.long)
    prompt, _, w = m.eval()(ids, x, mask)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    cands = torch.cat([m.bank.prompts, m.private.prompts[0:1]])                  # [n_cand, L, d]
    expect = torch.einsum("bn,nld->bld", w, cands) + m.private.prompts[0]
    assert torch.allclose(prompt, expect, atol=1e-6)
    train_prompt, _, train_w = m.train()(ids, x, mask)          # no noise: training is evaluation
    assert torch.equal(train_w, w) and torch.allclose(train_prompt, prompt)


def test_attempt_max_pools_the_input_without_its_padding():
    m = _attempt().eval()
    x = torch.randn(1, 4, 8)
    padded = torch.cat([x, torch.full((1, 3, 8), 50.0)], dim=1)
    mask = torch.cat([torch.ones(1, 4), torch.zeros(1, 3)], dim=1)
    ids = torch.zeros(1, dtype=torch.long)
    assert torch.allclose(m(ids, padded, mask)[2], m(ids, x, torch.ones(1, 4))[2])


def test_attempt_refuses_top_k_and_router_bias():
    with pytest.raises(ValueError, match="attention_gated"):
        CrossPTPrompt(PromptSpec(n_tasks=1, dim=8, n_sources=3, source_len=2, private_len=2, router="attention",
                                 top_k=2))
    with pytest.raises(ConfigError, match="attention_gated"):
        load_config(None, {"prompt.router": "attention", "prompt.n_sources": 3, "prompt.top_k": 2})


def test_gated_attention_router_keeps_top_k_in_training():
    m = CrossPTPrompt(PromptSpec(n_tasks=1, dim=8, n_sources=3, source_len=2, private_len=2,
                                 router="attention_gated", top_k=2)).train()
    _, _, w = m(torch.zeros(4, dtype=torch.long), torch.randn(4, 5, 8), torch.ones(4, 5))
    assert ((w > 0).sum(-1) == 2).all()


# ---- config keys -------------------------------------------------------------------------------------------
def test_router_bias_starts_tasks_on_their_private_prompt():
    cfg = load_config(None, {"prompt.router_bias": 2.0, "prompt.n_sources": 3})
    assert cfg.prompt.router_bias == 2.0
    m = CrossPTPrompt(PromptSpec(n_tasks=2, dim=4, n_sources=3, source_len=2, private_len=2, router_bias=2.0))
    assert torch.equal(m.router.logits, torch.tensor([[0.0, 0.0, 0.0, 2.0]] * 2))
    w = m.task_weights()
    assert float(w[0, -1]) == pytest.approx(math.exp(2) / (math.exp(2) + 3))


def test_source_lr_gives_learned_sources_their_own_group():
    m = CrossPTPrompt(PromptSpec(n_tasks=1, dim=4, n_sources=2, source_len=2, private_len=2, learn_sources=True))
    groups = {g["name"]: g for g in m.param_groups(0.3, 0.01, source_lr=0.001)}
    assert groups["sources"]["lr"] == 0.001 and groups["sources"]["params"] == [m.bank.prompts]
    assert all(p is not m.bank.prompts for p in groups["prompts"]["params"])
    assert load_config(None, {"optim.source_lr": 0.001, "prompt.learn_sources": True,
                              "prompt.n_sources": 2}).optim.source_lr == 0.001
    with pytest.raises(ConfigError, match="source_lr"):
        load_config(None, {"optim.source_lr": 0.001})


def _bank(tmp_path, dim: int):
    from crosspt.run.artifacts import save_bank

    prompts = torch.stack([torch.full((2, dim), float(i + 1)) for i in range(3)])      # [3, L_s, d]
    return save_bank(tmp_path / "bank.safetensors", prompts, backbone="b", tasks=["sst2", "rte", "mrpc"]), prompts


def test_include_own_source_false_leaves_the_targets_out(tmp_path):
    from crosspt.run.inputs import load_source_bank
    from crosspt.tasks.specs import resolve_tasks

    path, prompts = _bank(tmp_path, 4)
    over = {"tasks": ["rte"], "backbone.name": "b", "prompt.n_sources": 2, "prompt.source_len": 2,
            "prompt.source_bank": str(path)}
    tasks = resolve_tasks(["rte"])
    with_own = load_source_bank(load_config(None, over), 4, tasks)
    without = load_source_bank(load_config(None, {**over, "prompt.include_own_source": False}), 4, tasks)
    assert torch.equal(with_own, prompts[[0, 1]]) and torch.equal(without, prompts[[0, 2]])


def test_own_source_init_starts_each_task_from_its_own_source(tmp_path):
    from crosspt.run.inputs import load_own_sources
    from crosspt.tasks.specs import resolve_tasks

    path, prompts = _bank(tmp_path, 4)
    cfg = load_config(None, {"tasks": ["mrpc", "sst2"], "backbone.name": "b", "prompt.source_len": 2,
                             "prompt.private_len": 3, "prompt.source_bank": str(path), "prompt.init": "own_source"})
    own = load_own_sources(cfg, 4, resolve_tasks(cfg.tasks))
    assert torch.equal(own, prompts[[2, 0]])
    m = CrossPTPrompt(PromptSpec(n_tasks=2, dim=4, private_len=3, source_len=2, init="own_source"),
                      bank=torch.zeros(0, 2, 4), own_sources=own)
    assert torch.equal(m.private.prompts[0], torch.full((3, 4), 3.0))
    assert torch.equal(m.private.prompts[1], torch.full((3, 4), 1.0))
    with pytest.raises(ConfigError, match="no source prompt for cola"):
        load_own_sources(load_config(None, {**dict(cfg.model_dump()), "tasks": ["cola"]}), 4, resolve_tasks(["cola"]))
    with pytest.raises(ConfigError, match="source_bank"):
        load_config(None, {"prompt.init": "own_source"})


def test_label_semantics_names_uses_the_dataset_label_names():
    from crosspt.tasks.specs import get_task, label_text, parse_label_text

    cfg = load_config(None, {"prompt.label_semantics": "names"})
    rte = get_task("rte")
    assert [label_text(rte, i, cfg.prompt.label_semantics) for i in (0, 1)] == ["entailment", "not_entailment"]
    assert parse_label_text(get_task("mrpc"), "not_equivalent", "names") == 0
    assert label_text(get_task("sst2"), 1, "names") == "positive"


# ---- seq2seq placement -------------------------------------------------------------------------------------
def test_seq2seq_prompt_after_the_input_ignores_the_batch_padding(tiny_t5_path):
    from crosspt.backbones.loader import load_backbone
    from crosspt.tasks.data import Example
    from crosspt.tasks.specs import get_task

    tasks = [get_task("sst2")]
    after = load_backbone(str(tiny_t5_path), tasks, placement="after")
    before = load_backbone(str(tiny_t5_path), tasks)
    short = Example(task="sst2", texts=("fine",), label=1, uid="a")
    long = Example(task="sst2", texts=("a much longer sentence than the other one here",), label=0, uid="b")
    torch.manual_seed(0)
    prompt = torch.randn(1, 3, after.embed_dim)
    ones = torch.ones(1, 3, dtype=torch.long)

    def scores(bb, examples):
        batch = bb.collate(examples, train=False)
        n = len(examples)
        return bb.candidate_scores(prompt.expand(n, -1, -1), ones.expand(n, -1), batch)

    alone, in_batch = scores(after, [short])[0], scores(after, [short, long])[0]
    assert torch.allclose(alone, in_batch, atol=1e-4)          # the padding before it changes nothing
    assert not torch.allclose(alone, scores(before, [short])[0], atol=1e-4)


def test_placement_is_refused_where_a_family_has_one_place(minilm_path):
    from crosspt.backbones.loader import load_backbone
    from crosspt.tasks.specs import get_task

    with pytest.raises(ConfigError, match="placement 'before'"):
        load_backbone(str(minilm_path), [get_task("sst2")], placement="before")
    assert load_backbone(str(minilm_path), [get_task("sst2")], placement="after").family == "encoder"


# ---- the planted-source probe (issue 21) -------------------------------------------------------------------
def _planted_setup(data_dir, seed: int):
    """sst2 on the offline MiniLM, 32 rows per class: a PT run gives the task's own trained prompt; the bank
    holds it between two random prompts of the same per-token norm (unrelated, on the same scale)."""
    import tempfile

    from crosspt.backbones.loader import load_for_config
    from crosspt.run.inputs import prepare_data
    from crosspt.run.loop import LocalSession, run_loop
    from crosspt.run.model import build_model

    base = {"tasks": ["sst2"], "backbone.name": "minilm", "backbone.max_length": 32, "data.data_dir": str(data_dir),
            "data.shots": 32, "data.val_shots": 4, "data.max_test": 8, "prompt.source_len": 4,
            "prompt.private_len": 4, "prompt.init": "vocab", "train.batch_size": 8, "train.patience": None,
            "train.eval_initial": False, "seed": seed}
    pt = load_config(None, {**base, "optim.prompt_lr": 0.3, "train.epochs": 4, "train.checkpoint_every": 4})
    tasks, splits = prepare_data(pt)
    model = build_model(pt, tasks, backbone=load_for_config(pt, tasks))
    with tempfile.TemporaryDirectory() as d:
        run_loop(pt, LocalSession(d), model=model, splits=splits)
    own = model.prompt.private.prompts[0].detach().clone()                      # [L, d]
    rand = torch.randn(2, *own.shape, generator=torch.Generator().manual_seed(100 + seed))
    rand = rand / rand.norm(dim=-1, keepdim=True) * own.norm(dim=-1, keepdim=True)
    return base, tasks, splits, torch.stack([rand[0], own, rand[1]])           # own is candidate 1


@pytest.mark.slow
def test_planted_own_prompt_draws_the_router_under_the_default_rule(data_dir, minilm_path, tmp_path):
    """The router alone (no private prompt, frozen bank) must find the task's own trained prompt among random
    ones of the same norm: its weight ends clearly above uniform (1/3) and it is the top candidate."""
    from crosspt.backbones.loader import load_for_config
    from crosspt.run.loop import LocalSession, run_loop
    from crosspt.run.model import build_model

    torch.set_num_threads(1)
    base, tasks, splits, bank = _planted_setup(data_dir, seed=0)
    cfg = load_config(None, {**base, "prompt.n_sources": 3, "prompt.private_len": 0, "prompt.composition": "wavg",
                             "optim.router_lr": 0.1, "train.epochs": 4, "train.checkpoint_every": 4})
    assert cfg.prompt.normalization == "dirichlet"          # the default rule
    model = build_model(cfg, tasks, backbone=load_for_config(cfg, tasks), bank=bank)
    trace = []

    class Trace(LocalSession):
        def report(self, metrics, checkpoint_dir):
            if not metrics.get("final_epoch"):              # the last report comes after validation's pick
                trace.append(model.prompt.task_weights()[0].tolist())
            return super().report(metrics, checkpoint_dir)

    run_loop(cfg, Trace(tmp_path), model=model, splits=splits)
    last = trace[-1]
    assert last[1] > 0.5 and max(range(3), key=last.__getitem__) == 1, trace
