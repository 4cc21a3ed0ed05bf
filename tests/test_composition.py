"""The CrossPT maths: gates, top-k, normalisation, annealing, masks and composed lengths."""
import math

import pytest
import torch

from crosspt.method import composition as C
from crosspt.method.prompts import CrossPTPrompt, PromptSpec, init_prompt


def test_annealing_decays_to_floor():
    temps = [C.annealed_temperature(s, 5.0, 0.1, 0.01) for s in range(0, 2000, 100)]
    assert temps[0] == 5.0
    assert all(a >= b for a, b in zip(temps, temps[1:]))
    assert temps[-1] == pytest.approx(0.1)
    assert C.annealed_temperature(10, 5.0, 0.1, 0.01) == pytest.approx(5.0 * math.exp(-0.1))


def test_train_weights_keep_topk_and_sum_to_one():
    torch.manual_seed(0)
    logits = torch.randn(32, 6, requires_grad=True)
    w = C.train_weights(logits, temperature=0.5, top_k=2)
    assert torch.allclose(w.sum(-1), torch.ones(32))
    assert ((w > 0).sum(-1) == 2).all()
    w.pow(2).sum().backward()          # gates are reparameterised: logits get a gradient
    assert logits.grad.abs().sum() > 0


def test_low_temperature_gates_follow_logits():
    logits = torch.tensor([[8.0, -8.0, 0.0]]).repeat(200, 1)
    w = C.train_weights(logits, temperature=0.05, top_k=1)
    assert (w.argmax(-1) == 0).float().mean() > 0.95


def test_eval_weights_deterministic_softmax():
    logits = torch.randn(4, 5)
    assert torch.equal(C.eval_weights(logits), C.eval_weights(logits))
    assert torch.allclose(C.eval_weights(logits), torch.softmax(logits, -1))


@pytest.mark.parametrize("composition", ["cat", "wavg"])
@pytest.mark.parametrize("n_src,L_s,L_p", [(3, 4, 4), (2, 4, 0), (0, 4, 5), (2, 3, 6)])
def test_composed_lengths_and_masks(composition, n_src, L_s, L_p):
    spec = PromptSpec(n_tasks=2, dim=8, n_sources=n_src, source_len=L_s, private_len=L_p,
                      composition=composition)
    m = CrossPTPrompt(spec).eval()
    ids = torch.tensor([0, 1, 1])
    prompt, mask, w = m(ids)
    assert prompt.shape == (3, spec.composed_len, 8)
    assert mask.shape == (3, spec.composed_len)
    assert w.shape == (3, spec.n_candidates)
    if composition == "cat":   # eval: all candidates weighted > 0, only padding masked
        L = max(L_s if n_src else 0, L_p)
        assert int(mask[0].sum()) == n_src * L_s + L_p
        assert spec.composed_len == spec.n_candidates * L
    else:
        assert int(mask[0].sum()) == max(L_s if n_src else 0, L_p)


def test_cat_masks_candidates_dropped_by_topk():
    spec = PromptSpec(n_tasks=1, dim=4, n_sources=4, source_len=3, private_len=3, top_k=2)
    m = CrossPTPrompt(spec).train()
    prompt, mask, w = m(torch.zeros(5, dtype=torch.long))
    assert (mask.sum(-1) == 2 * 3).all()
    kept = (w > 0).repeat_interleave(3, dim=1)
    assert torch.equal(mask.bool(), kept)


def test_cat_is_weighted_concat_and_wavg_is_weighted_mean():
    bank = torch.randn(2, 3, 4)
    private = torch.randn(1, 3, 4)
    logits = torch.tensor([[0.3, -0.2, 1.0]])
    ids = torch.tensor([0])
    w = torch.softmax(logits, -1)[0]
    cat, _, _ = C.compose(bank, private, logits, ids, composition="cat")
    expect = torch.cat([w[0] * bank[0], w[1] * bank[1], w[2] * private[0]])
    assert torch.allclose(cat[0], expect, atol=1e-6)
    avg, _, _ = C.compose(bank, private, logits, ids, composition="wavg")
    assert torch.allclose(avg[0], w[0] * bank[0] + w[1] * bank[1] + w[2] * private[0], atol=1e-6)


def test_private_len_zero_routes_over_sources_only():
    spec = PromptSpec(n_tasks=3, dim=4, n_sources=2, source_len=5, private_len=0)
    m = CrossPTPrompt(spec)
    assert spec.n_candidates == 2
    prompt, mask, w = m.eval()(torch.tensor([0, 2]))
    assert prompt.shape == (2, 10, 4) and w.shape == (2, 2)
    assert not m.private.prompts.requires_grad
    names = {g["name"] for g in m.param_groups(0.1, 0.01)}
    assert names == {"router"}           # frozen bank, no private prompt: only the router learns


def test_vanilla_prompt_tuning_is_the_private_prompt():
    spec = PromptSpec(n_tasks=2, dim=4, n_sources=0, private_len=6)
    m = CrossPTPrompt(spec).train()
    prompt, mask, w = m(torch.tensor([1, 0]))
    assert torch.allclose(w, torch.ones(2, 1))
    assert torch.allclose(prompt[0], m.private.prompts[1])


def test_per_task_private_prompts_and_frozen_bank_gradients():
    spec = PromptSpec(n_tasks=3, dim=4, n_sources=2, source_len=2, private_len=2, learn_sources=False)
    m = CrossPTPrompt(spec).train()
    prompt, mask, w = m(torch.tensor([1, 1]))
    prompt.sum().backward()
    assert m.bank.prompts.grad is None
    g = m.private.prompts.grad
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0


def test_param_groups_by_module_with_separate_lrs():
    spec = PromptSpec(n_tasks=2, dim=4, n_sources=2, source_len=2, private_len=2, learn_sources=True)
    m = CrossPTPrompt(spec)
    groups = {g["name"]: g for g in m.param_groups(0.3, 0.01)}
    assert groups["prompts"]["lr"] == 0.3 and groups["router"]["lr"] == 0.01
    assert any(p is m.bank.prompts for p in groups["prompts"]["params"])
    assert groups["router"]["params"] == [m.router.logits]


def test_temperature_follows_step():
    spec = PromptSpec(n_tasks=1, dim=4, n_sources=2, source_len=2, private_len=2,
                      temp_start=4.0, temp_floor=0.5, temp_rate=0.1, temp_schedule="step")
    m = CrossPTPrompt(spec)
    assert m.temperature == 4.0
    m.set_step(1000)
    assert m.temperature == 0.5


def test_attention_router_depends_on_input():
    torch.manual_seed(0)
    spec = PromptSpec(n_tasks=1, dim=8, n_sources=3, source_len=2, private_len=2, router="attention")
    m = CrossPTPrompt(spec).eval()
    torch.nn.init.normal_(m.router.up.weight)
    ids = torch.zeros(2, dtype=torch.long)
    x = torch.randn(2, 5, 8)
    _, _, w = m(ids, x, torch.ones(2, 5))
    assert not torch.allclose(w[0], w[1])
    with pytest.raises(ValueError, match="collapse"):
        m.collapsed(0)


def test_collapsed_prompt_equals_eval_composition():
    spec = PromptSpec(n_tasks=2, dim=4, n_sources=2, source_len=3, private_len=2, composition="cat")
    m = CrossPTPrompt(spec).eval()
    torch.nn.init.normal_(m.router.logits)
    prompt, mask, _ = m(torch.tensor([1]))
    collapsed, cmask = m.collapsed(1)
    assert torch.allclose(collapsed, prompt[0][mask[0].bool()])
    assert collapsed.shape == (2 * 3 + 2, 4)


def test_invalid_specs_raise():
    with pytest.raises(ValueError, match="at least one candidate"):
        CrossPTPrompt(PromptSpec(n_tasks=1, dim=4, n_sources=0, private_len=0))
    with pytest.raises(ValueError, match="top_k"):
        CrossPTPrompt(PromptSpec(n_tasks=1, dim=4, n_sources=1, private_len=2, top_k=3))
    with pytest.raises(ValueError, match="shape"):
        CrossPTPrompt(PromptSpec(n_tasks=1, dim=4, n_sources=2, source_len=3), bank=torch.zeros(2, 4, 4))


def test_inits():
    emb = torch.randn(100, 8)
    g = torch.Generator().manual_seed(0)
    v = init_prompt((2, 5, 8), "vocab", word_embeddings=emb, generator=g)
    assert all(any(torch.equal(row, e) for e in emb) for row in v.reshape(-1, 8))
    t = init_prompt((1, 5, 8), "text", word_embeddings=emb, text_ids=[3, 7])
    assert torch.equal(t[0, 0], emb[3]) and torch.equal(t[0, 1], emb[7]) and torch.equal(t[0, 2], emb[3])
    s = init_prompt((2, 3, 8), "source", source=torch.ones(3, 8))
    assert torch.equal(s, torch.ones(2, 3, 8))
    a = init_prompt((2, 3, 8), "random", word_embeddings=emb, generator=torch.Generator().manual_seed(1))
    b = init_prompt((2, 3, 8), "random", word_embeddings=emb, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
