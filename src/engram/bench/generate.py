"""``engram bench generate``: batched decoding throughput, ours against Hugging Face ``transformers``.

Our ``tiny-dense`` backbone and a ``LlamaForCausalLM`` of the same shape (width, depth, heads, SwiGLU
width, RoPE, RMSNorm, untied head), fp32, random weights, the same prompts (real text of ``mini``'s
held-out split, tokenised by a BPE of the preset's vocabulary; random ids in ``--quick``), greedy. HF runs
``model.generate`` with its default dynamic KV cache. Decode tokens/s for HF = new tokens / (time to
generate N new tokens - time to generate 1), which removes its prefill; ours reports prefill and decode
separately (``GenerationResult``). Both sides are timed alternately, medians of ``repeats``.
"""

from __future__ import annotations

import statistics
import time

import torch

from engram.config import preset
from engram.infer.generate import generate_batch
from engram.model import build_model
from engram.report import format_table

QUICK = dict(prompts=2, prompt_len=8, new_tokens=8, repeats=1, real_text=False)


def hf_llama_like(cfg):
    """A transformers Llama with the shape of our dense backbone ``cfg``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_head, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attention_bias=False, mlp_bias=False)
    return LlamaForCausalLM(hc).eval()


def _prompts(n: int, length: int, vocab: int, real_text: bool) -> list[list[int]]:
    if not real_text:
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab, (n, length), generator=g).tolist()
    from engram.data.corpora import default_cache_dir, prepare
    from engram.train.trainer import corpus_tokenizer

    cache = default_cache_dir()
    tok = corpus_tokenizer("mini", vocab, cache, 20_000_000)
    text = " ".join(d.text for d in prepare("mini", cache).documents_of("val")[:20])
    ids = tok.encode(text).ids
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def run(prompts: int = 8, prompt_len: int = 32, new_tokens: int = 64, repeats: int = 5, real_text: bool = True) -> dict:
    torch.manual_seed(0)
    cfg = preset("tiny-dense")
    ours = build_model(cfg).eval()
    hf = hf_llama_like(cfg)
    batch = _prompts(prompts, prompt_len, cfg.vocab_size, real_text)
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)

    def hf_gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
        return time.perf_counter() - t0

    ours_decode, ours_prefill, hf_decode = [], [], []
    for _ in range(repeats + 1):  # the first round warms both up and is dropped
        res = generate_batch(ours, batch, new_tokens, temperature=0)
        ours_decode.append(res.decode_tokens / res.decode_s)
        ours_prefill.append(res.prefill_tokens / res.prefill_s)
        full, one = hf_gen(new_tokens), hf_gen(1)
        hf_decode.append(prompts * (new_tokens - 1) / max(full - one, 1e-9))
    d_ours, d_hf = statistics.median(ours_decode[1:]), statistics.median(hf_decode[1:])
    rows = [["engram generate_batch", d_ours, statistics.median(ours_prefill[1:]), d_ours / d_hf],
            ["transformers generate (Llama)", d_hf, "-", 1.0]]
    table = format_table(["decoder (tiny-dense shape, fp32, greedy)", "decode tokens/s", "prefill tokens/s",
                          "decode vs HF"], rows)
    table += f"\n{prompts} prompts x {prompt_len} tokens + {new_tokens} new; threads {torch.get_num_threads()}"
    return {"table": table, "ratio": d_ours / d_hf, "decode_tok_s": {"engram": d_ours, "hf": d_hf},
            "config": dict(prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens)}
