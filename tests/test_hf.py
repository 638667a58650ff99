"""engram.hf: Engram added to real transformers models (tiny random ones built from config classes) with
real tokenizers: a 512-id BPE trained on stdlib source for speed, and GPT-2's own for the GPT-2 family.

Exact: zero-init logits equal the base model's; hash ids of padded rows equal the unpadded row's; a
saved and reloaded adapter reproduces the logits. Close (atol in each test): cached decoding, greedy and
beam search against a full forward without cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from engram.hf import (
    AdapterFileError,
    AdapterMismatchError,
    EngramCache,
    UnsupportedModelError,
    VocabularyMismatchError,
    add_engram,
    engram_adapter,
    load_adapter,
    save_adapter,
)
from engram.tokenizer import CompressionMap, gpt2_tokenizer
from tokenizers import Tokenizer

EOS = 0  # <|endoftext|> of the small BPE
GPT2_EOS = 50256
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
SMALL = dict(heads=2, table_sizes=(1009, 1013), d_mem=32)  # 4 heads of width 8 per Engram layer


def config_of(family: str, vocab: int = 512, hidden: int = 64, layers: int = 3, eos: int = EOS):
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=eos, eos_token_id=eos,
    )
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                          bos_token_id=eos, eos_token_id=eos)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
            "qwen3": Qwen3Config}[family](**common)


def tiny(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_of(family, **kw)).eval()


@pytest.fixture(scope="module")
def tok(stdlib_bpe):
    return stdlib_bpe


@pytest.fixture(scope="module")
def cmap(tok):
    return CompressionMap.build(tok)


def wake(adapter, seed: int = 1) -> None:
    """Move Engram off its zero init (value projection and conv), so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            w = layer.fusion.value_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
            c = layer.fusion.short_conv.weight
            c.copy_(torch.randn(c.shape, generator=g) * 0.5)


def prompts(tok, B: int = 2):
    """A left-padded batch of real text: row 1 is shorter, padded with EOS on the left."""
    texts = ["def main(argv):\n    parser = argparse.ArgumentParser(", "To be, or not to be"]
    rows = [tok.encode(t).ids for t in texts[:B]]
    T = max(len(r) for r in rows)
    ids = torch.full((B, T), EOS, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from a padded mask (GPT-2's learned positions need them)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def adapted(family, tok, cmap, layers=(0, 2), seed=0, **kw):
    model = tiny(family, seed, **kw)
    base = copy.deepcopy(model)
    adapter = add_engram(model, tok, layers=layers, compression=cmap, **SMALL)
    return base, model, adapter


# ------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_logits_equal_base_exactly(family, tok, cmap):
    base, model, adapter = adapted(family, tok, cmap)
    ids, mask = prompts(tok)
    with torch.no_grad():
        want = base(ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(model(ids, attention_mask=mask, use_cache=False).logits, want)
        assert torch.equal(model(ids, attention_mask=mask, use_cache=True).logits, want)  # the cached path
        wake(adapter)
        assert not torch.allclose(model(ids, attention_mask=mask).logits, want)  # and Engram is live
    assert adapter.hasher.pad_id == cmap.lookup[EOS]  # pad defaults to the tokenizer's end-of-text


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_full_forward_argmax(family, tok, cmap):
    _, model, adapter = adapted(family, tok, cmap)
    wake(adapter)
    ids, mask = prompts(tok)
    T, new = ids.shape[1], 6
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=EOS)
    assert isinstance(out.cache, EngramCache) and out.cache.engram_state is not None
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False).logits
    steps = full[:, T - 1 : T - 1 + new]
    assert torch.equal(steps.argmax(-1), out.sequences[:, T:])
    torch.testing.assert_close(torch.stack(out.logits, 1), steps, atol=1e-4, rtol=0)


def test_gpt2_with_its_own_tokenizer():
    """GPT-2's 50,257-id tokenizer on a GPT-2 model: exact at init, then greedy decoding equals the forward."""
    tok = gpt2_tokenizer()
    model = tiny("gpt2", vocab=50257, eos=GPT2_EOS)
    base = copy.deepcopy(model)
    adapter = add_engram(model, tok, layers=[1], **SMALL)
    assert adapter.config.pad_id == GPT2_EOS and adapter.compression.compressed_vocab_size < 50257
    ids = torch.tensor([tok.encode("Alexander the Great was a king of Macedon").ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    wake(adapter)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=GPT2_EOS)
    with torch.no_grad():
        full = model(out, use_cache=False).logits
    assert torch.equal(full[:, ids.shape[1] - 1 : -1].argmax(-1), out[:, ids.shape[1]:])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_matches_uncached_reforward(family, tok, cmap):
    _, model, adapter = adapted(family, tok, cmap)
    wake(adapter, seed=3)
    ids, mask = prompts(tok)
    T, new, beams = ids.shape[1], 5, 3
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=beams, num_return_sequences=beams,
                         do_sample=False, length_penalty=0.0, early_stopping=False, eos_token_id=None,
                         pad_token_id=EOS, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2 * beams, T + new)
    reordered = out.beam_indices[:, :new] != torch.arange(2 * beams)[:, None]
    assert bool(reordered.any())  # beams really were reordered, so the reorder of the Engram state counted
    full_mask = torch.cat([mask.repeat_interleave(beams, 0), torch.ones(2 * beams, new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False).logits
    logp = logits.float().log_softmax(-1)
    gen = out.sequences[:, T:]
    score = logp[:, T - 1 : -1].gather(-1, gen[..., None])[..., 0].sum(-1)  # length_penalty 0: a plain sum
    torch.testing.assert_close(score, out.sequences_scores, atol=1e-4, rtol=0)


def test_chunked_prefill_with_cache_equals_full_forward(tok, cmap):
    _, model, adapter = adapted("qwen3", tok, cmap)
    wake(adapter)
    ids = torch.tensor([tok.encode("Alexander the Great was a king of the ancient Greek kingdom").ids])
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        first = model(ids[:, :5], use_cache=True)
        second = model(ids[:, 5:7], cache=first.cache)  # a 2-token chunk continues history and conv
        third = model(ids[:, 7:], cache=second.cache)
    got = torch.cat([first.logits, second.logits, third.logits], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_padding_hashes_as_padding(tok, cmap):
    _, model, adapter = adapted("llama", tok, cmap)
    wake(adapter)
    ids, mask = prompts(tok)
    pads = int((mask[1] == 0).sum())
    assert pads > 0
    got = adapter.hash(ids, mask)[1, pads:]
    assert torch.equal(got, adapter.hash(ids[1:2, pads:])[0])  # exact: as if the row had no padding
    other = ids.clone()
    other[1, :pads] = torch.arange(100, 100 + pads)  # other tokens under the padding
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits[1, pads:]
        b = model(other, attention_mask=mask).logits[1, pads:]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_reproduces_logits(tok, cmap, tmp_path):
    base, model, adapter = adapted("mistral", tok, cmap, layers=(1,))
    wake(adapter)
    with torch.no_grad():
        adapter.layers[1].table.weight.mul_(1.5)
    path = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == ["engram.1.rows", "engram_bundle.json", "fusion.safetensors"]
    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tok, path, compression=cmap)
    ids, mask = prompts(tok)
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert loaded.config == adapter.config and loaded.hasher.fingerprint() == adapter.hasher.fingerprint()
    with pytest.raises(ValueError, match="already has Engram"):
        load_adapter(fresh, tok, path, compression=cmap)


def test_load_refuses_another_base_model(tok, cmap, tmp_path):
    _, model, _ = adapted("llama", tok, cmap, layers=(1,))
    path = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match=r"config\.hidden_size: 64 != 96"):
        load_adapter(tiny("llama", hidden=96), tok, path, compression=cmap)
    with pytest.raises(AdapterMismatchError, match=r"class: 'LlamaForCausalLM' != 'Qwen2ForCausalLM'"):
        load_adapter(tiny("qwen2"), tok, path, compression=cmap)


def test_load_refuses_another_tokenizer(tok, cmap, tmp_path):
    _, model, _ = adapted("llama", tok, cmap, layers=(1,), vocab=520)  # room for one added token
    path = save_adapter(model, tmp_path / "adapter")
    other = Tokenizer.from_str(tok.to_str())
    other.add_tokens(["<|image|>"])
    target = tiny("llama", vocab=520)
    with pytest.raises(AdapterMismatchError, match=r"tokenizer\.vocab_sha256.*tokenizer\.vocab_size: 512 != 513"):
        load_adapter(target, other, path)
    assert "engram" not in target.model.layers[1]._modules  # refused before touching the model


def test_load_refuses_corrupt_files(tok, cmap, tmp_path):
    _, model, _ = adapted("gpt2", tok, cmap, layers=(1,))
    path = save_adapter(model, tmp_path / "adapter")
    blob = bytearray((path / "engram.1.rows").read_bytes())
    blob[-5] ^= 0xFF
    (path / "engram.1.rows").write_bytes(bytes(blob))
    with pytest.raises(AdapterFileError, match="engram.1.rows is truncated or corrupt"):
        load_adapter(tiny("gpt2"), tok, path, compression=cmap)
    with pytest.raises(AdapterFileError, match="not an Engram adapter"):
        load_adapter(tiny("gpt2"), tok, tmp_path, compression=cmap)


def test_adapter_saved_in_the_earlier_layout_still_loads(tok, cmap, tmp_path):
    """Adapters written as engram_adapter.json (format "engram-hf-adapter" 1, whole-file sha256) load."""
    import json

    from engram.io import sha256_file

    base, model, adapter = adapted("llama", tok, cmap, layers=(1,))
    wake(adapter)
    path = save_adapter(model, tmp_path / "adapter")
    meta = json.loads((path / "engram_bundle.json").read_text())
    legacy = {"format": "engram-hf-adapter", "format_version": 1, "engram": meta["engram"],
              "hash_layout": meta["hash_layout"], "hash_fingerprint": meta["hash_fingerprint"],
              "base_model": meta["base"], "tables": meta["tables"],
              "files": {n: {"bytes": (path / n).stat().st_size, "sha256": sha256_file(path / n)} for n in meta["files"]}}
    (path / "engram_bundle.json").unlink()
    (path / "engram_adapter.json").write_text(json.dumps(legacy))
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tok, path, compression=cmap)
    ids, mask = prompts(tok)
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_adapter_is_a_bundle_usable_standalone(tok, cmap, tmp_path):
    """The saved adapter loads as an Engram layer set (no transformers model) and computes the same Y."""
    from engram.interop.bundle import load_bundle

    _, model, adapter = adapted("qwen2", tok, cmap, layers=(1,))
    wake(adapter)
    path = save_adapter(model, tmp_path / "adapter")
    engram = load_bundle(path, tok, compression=cmap, tier="disk")
    ids, _ = prompts(tok)
    h = torch.randn(*ids.shape, 1, 64)
    with torch.no_grad():
        want, _ = adapter.layers[1](h, adapter.hash(ids)[:, :, 0])
        got, _ = engram(1, h, engram.hash(ids))
    assert torch.equal(got, want)


def test_a_bundle_made_elsewhere_loads_when_it_fits(tok, cmap, tmp_path):
    """A bundle that records only its tokenizer loads into a model of its width; one with several residual
    branches is refused, naming why."""
    from engram.interop.bundle import BundleLayer, write_bundle
    from engram.model import build_engram_layer
    from engram.tokenizer import tokenizer_identity

    _, model, adapter = adapted("llama", tok, cmap, layers=(1,))
    cfg, hasher = adapter.config, adapter.hasher
    made = {}
    for branches in (1, 2):
        torch.manual_seed(branches)
        made[branches] = layer = build_engram_layer(cfg, 64, branches, hasher.head_sizes(1))
        rows = layer.table.weight.detach()
        write_bundle(tmp_path / f"b{branches}", cfg, hasher, 64, branches,
                     {1: BundleLayer(layer.fusion.state_dict(), lambda a, b, rows=rows: rows[a:b], "fp32")},
                     {"tokenizer": tokenizer_identity(tok, cmap)}, {"kind": "test"})
    loaded = load_adapter(tiny("llama"), tok, tmp_path / "b1", compression=cmap)
    assert torch.equal(loaded.layers[1].table.weight, made[1].table.weight)
    assert torch.equal(loaded.layers[1].fusion.key_proj.weight, made[1].fusion.key_proj.weight)
    with pytest.raises(AdapterFileError, match="read 2 residual branches; a transformers model has one"):
        load_adapter(tiny("llama"), tok, tmp_path / "b2", compression=cmap)
    with pytest.raises(AdapterMismatchError, match=r"tokenizer\.vocab_size: 512 != 513"):
        other = Tokenizer.from_str(tok.to_str())
        other.add_tokens(["<|image|>"])
        load_adapter(tiny("llama", vocab=520), other, tmp_path / "b1")


# ------------------------------------------------------------------------------------------- bad input


def test_unknown_model_class_lists_supported(tok, cmap):
    torch.manual_seed(0)
    neox = transformers.AutoModelForCausalLM.from_config(
        GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    )
    with pytest.raises(UnsupportedModelError, match=r"GPTNeoXForCausalLM.*gpt2 \(GPT2LMHeadModel\), llama \(LlamaForCausalLM\), "
                       r"mistral \(MistralForCausalLM\), qwen2 \(Qwen2ForCausalLM\), qwen3 \(Qwen3ForCausalLM\)"):
        add_engram(neox, tok, layers=[0], compression=cmap, **SMALL)


def test_layer_index_out_of_range(tok, cmap):
    with pytest.raises(IndexError, match=r"\[3\] out of range: LlamaForCausalLM has 3 decoder layers \(0\.\.2\)"):
        add_engram(tiny("llama"), tok, layers=[1, 3], compression=cmap, **SMALL)


def test_tokenizer_that_does_not_fit_the_embedding(tok, cmap):
    with pytest.raises(VocabularyMismatchError, match="512 ids but the model's embedding has only 400 rows"):
        add_engram(tiny("llama", vocab=400), tok, compression=cmap, **SMALL)
    model = tiny("qwen2")
    model.config.eos_token_id = 151643  # a Qwen tokenizer's id: not one of this tokenizer's
    with pytest.raises(VocabularyMismatchError, match="eos_token_id=151643 is not an id of this tokenizer"):
        add_engram(model, tok, compression=cmap, **SMALL)


def test_other_bad_calls(tok, cmap):
    _, model, adapter = adapted("llama", tok, cmap)
    assert engram_adapter(model) is adapter
    with pytest.raises(ValueError, match="already has Engram"):
        add_engram(model, tok, compression=cmap, **SMALL)
    with pytest.raises(ValueError, match="call the model with input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(TypeError, match="unknown Engram settings"):
        add_engram(tiny("llama"), tok, compression=cmap, head=2)
    with pytest.raises(ValueError, match="no Engram adapter"):
        engram_adapter(tiny("llama"))
    ids, _ = prompts(tok)
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).cache
        with pytest.raises(ValueError, match="holds Engram state for 2 rows, this call has 1"):
            model(ids[:1, 4:], cache=cache)
        with pytest.raises(ValueError, match="StaticCache is not supported"):
            model.generate(ids, max_new_tokens=2, cache_implementation="static", pad_token_id=EOS)
        with pytest.raises(NotImplementedError, match="cannot be rolled back"):
            cache.crop(1)


def test_tokenizer_without_tokenizers_backend_is_refused():
    vocab_only = {"<|endoftext|>": 0, "a": 1}  # e.g. a vocabulary dict instead of a tokenizer
    with pytest.raises(TypeError, match="needs a fast tokenizer.*got dict"):
        add_engram(tiny("llama"), vocab_only, **SMALL)
