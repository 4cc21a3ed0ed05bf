"""Tiny random backbones for tests, built fully offline.

`build_tiny_t5(path)` / `build_tiny_decoder(path)` save a randomly initialised model plus a fast
tokenizer to `path`, so that `crosspt.backbones.loader.load_backbone(path, tasks)` works without network.

The tokenizer is a small WordPiece vocabulary cut from the one shipped with the offline
all-MiniLM-L6-v2 package (`vocab.txt`): the 5 special tokens, every ASCII character and its `##`
continuation, and the `n_words` most frequent entries (default 3000: ~3.2k tokens in all, so any
ASCII text tokenises without [UNK] and the tiny models' output softmax stays small); wrapped with the
`tokenizers` library:
- T5 flavour: `[PAD]`(0) = pad = decoder start, `[SEP]`(3) = eos appended to every sequence
  (like T5's `</s>`), `[UNK]`(1) = unk;
- decoder flavour: no special tokens added automatically (like GPT-2); `[SEP]` = eos, `[PAD]` = pad,
  `[CLS]` = bos.
"""
from __future__ import annotations

from pathlib import Path

import torch

from crosspt.backbones.loader import minilm_path

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


def tiny_vocab(n_words: int = 3000) -> dict[str, int]:
    """Specials, ASCII characters (+ `##` forms) and the `n_words` most frequent MiniLM vocab entries."""
    with open(minilm_path() / "vocab.txt", encoding="utf-8") as f:
        full = [line.rstrip("\n") for line in f]
    tokens = [PAD, UNK, CLS, SEP, "[MASK]"]
    tokens += [chr(c) for c in range(33, 127)] + ["##" + chr(c) for c in range(33, 127)]
    words = [w for w in full[1996:] if w.isascii() and w not in tokens]
    seen = set(tokens)
    for w in words[:n_words]:
        if w not in seen:
            seen.add(w)
            tokens.append(w)
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_tokenizer(*, append_eos: bool, n_words: int = 3000):
    """A `PreTrainedTokenizerFast` over a small MiniLM-derived WordPiece vocab (lower-cased, BERT
    pre-tokenisation)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab(n_words)
    tok = Tokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {SEP}", pair=f"$A {SEP} $B:1 {SEP}:1", special_tokens=[(SEP, vocab[SEP])])
        specials = dict(pad_token=PAD, eos_token=SEP, unk_token=UNK)
    else:
        specials = dict(pad_token=PAD, eos_token=SEP, unk_token=UNK, bos_token=CLS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)


def _ids(tokenizer) -> dict[str, int]:
    return {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "vocab": len(tokenizer)}


def build_tiny_t5(path, *, d_model: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                  initializer_factor: float = 1.5, embedding_scale: float = 1.0,
                  n_words: int = 3000) -> Path:
    """Save a random tiny `T5ForConditionalGeneration` + tokenizer to `path`; return the path.

    The defaults (wider-than-standard init) give a random model whose output softmax can be driven
    to a chosen word by a soft prompt alone: what the learning tests need."""
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    tokenizer = build_tiny_tokenizer(append_eos=True, n_words=n_words)
    ids = _ids(tokenizer)
    config = T5Config(
        vocab_size=ids["vocab"], d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
        num_layers=layers, num_decoder_layers=layers, num_heads=heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        pad_token_id=ids["pad"], eos_token_id=ids["eos"], decoder_start_token_id=ids["pad"],
        feed_forward_proj="relu", initializer_factor=float(initializer_factor))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        with torch.no_grad():  # tied in/out embeddings; wider ones give a softmax that can peak
            model.shared.weight.mul_(embedding_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_decoder(path, *, d_model: int = 64, layers: int = 2, heads: int = 2, seed: int = 0,
                       initializer_range: float = 0.2, lm_head_std: float | None = 0.3,
                       n_words: int = 3000) -> Path:
    """Save a random tiny GPT-2 style causal LM + tokenizer to `path`; return the path.

    Wider-than-standard init and an untied output layer (`lm_head_std`; None ties it to the input
    embeddings), so that a soft prompt alone can make the model emit a chosen word."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    tokenizer = build_tiny_tokenizer(append_eos=False, n_words=n_words)
    ids = _ids(tokenizer)
    config = GPT2Config(
        vocab_size=ids["vocab"], n_positions=512, n_embd=d_model, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=initializer_range,
        tie_word_embeddings=lm_head_std is None, bos_token_id=tokenizer.bos_token_id, eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        if lm_head_std:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * lm_head_std)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_bpe_tokenizer(vocab_size: int = 2000):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM2 style: a word's leading space is part of its token,
    "Ġpositive") trained on GLUE-like words and the built-in label words; `<|endoftext|>` = bos/unk,
    `<|im_end|>` = eos = pad, nothing added automatically (like SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from crosspt.tasks.specs import OPAQUE_WORDS, get_task, list_tasks

    words = set(tiny_vocab(1500)) | set(OPAQUE_WORDS)
    for name in list_tasks():
        t = get_task(name)
        for mode_words in t.label_words.values():
            words |= set(mode_words)
        words |= set(t.label_names) | {t.prefix} | set(t.text_fields)
    corpus = [" ".join(sorted(w for w in words if w.isascii() and not w.startswith("[")))] * 3
    corpus += ["answer: positive", "answer: not_entailment", "sentence1: a sentence2: b\nanswer: yes"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", model_max_length=512)


def build_tiny_llama(path, *, d_model: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     seed: int = 0, initializer_range: float = 0.2) -> Path:
    """Save a random tiny Llama (RoPE, grouped-query attention, tied embeddings: SmolLM2's architecture) with
    a byte-level BPE tokenizer to `path`; return the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        initializer_range=initializer_range, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# SmolLM2-135M-Instruct's chat template as its tokenizer ships it (a system turn when the conversation has none)
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_chat_llama(path, **kw) -> Path:
    """`build_tiny_llama` whose tokenizer carries SmolLM2's chat template (so `backbone.template: auto` is chat)."""
    from transformers import AutoTokenizer

    path = build_tiny_llama(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path
