"""Interventions against their definitions, on tiny GPT-2 and Llama models: steering (additive,
orthogonal, cap) while generating with a KV cache, ablation of neurons and SAE features, and
activation patching, batched, against hooks written by hand and unbatched runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import random_sae

from app.inference_errors import BadInput, TooLong
from workers.ablation import Ablation, ablate, ablation_edits
from workers.generation import generate
from workers.inference import ServedModel, ServedSource
from workers.loading import load_model
from workers.patching import Site, run_patches, sweep
from workers.steering import SteerFeature, steer

CLEAN = "When John and Mary went to the store, John gave the bag to"
CORRUPTED = "When John and Mary went to the store, Mary gave the bag to"
RESID = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def served(request, tiny_gpt2_dir, tiny_llama_dir) -> ServedModel:
    """A tiny model with its neurons of layer 0 and two SAEs: a TopK one on the residual stream
    and one that normalises its input (constant_norm_rescale) on layer 1's MLP neurons."""
    lm = load_model(str({"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[request.param]))
    res = random_sae("topk", d_in=lm.d_model, d_sae=40, hook=RESID, seed=3)
    post = random_sae("standard", d_in=lm.d_mlp, d_sae=24, hook="blocks.1.mlp.hook_post", seed=4,
                      normalize_activations="constant_norm_rescale")
    return ServedModel(lm, {
        "0-mlp": ServedSource("0-mlp", "neurons", "blocks.0.mlp.hook_post", lm.d_mlp),
        "res": ServedSource("res", "sae", RESID, 40, encode=res.encode, sae=res),
        "post": ServedSource("post", "sae", post.cfg.hook_name, 24, encode=post.encode, sae=post)})


def _blocks(lm):
    return lm.hf_model.transformer.h if lm.arch == "gpt2" else lm.hf_model.model.layers


def _down_proj(lm, layer):
    mlp = _blocks(lm)[layer].mlp
    return mlp.c_proj if lm.arch == "gpt2" else mlp.down_proj


def _by_hand(module, fn, *, pre: bool):
    """A hook written here, apart from `LoadedModel.editing`: fn(act) replaces the module's
    output, or (pre) its first input."""
    if pre:
        def hook(mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return module.register_forward_pre_hook(hook, with_kwargs=True)

    def hook(mod, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    return module.register_forward_hook(hook)


def _shift(index, by):
    """An activation with one neuron's value moved by `by`."""
    def fn(x):
        y = x.clone()
        y[..., index] += by
        return y
    return fn


def _greedy_without_cache(lm, prompt, n, penalty=0.0):
    """Greedy generation by recomputing the whole sequence at every step (no KV cache), each
    token's logit lowered by `penalty` per time it occurs so far."""
    ids, logprobs = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ids), minlength=logits.shape[0]).float()
            tok = int((logits - penalty * counts).argmax())
            ids.append(tok)
            logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
    return ids[len(prompt):], logprobs


def _capture(lm, ids, hook, edits=None):
    """The activation at a hook point, with `edits` applied (the capture runs after them)."""
    got = {}
    with lm.editing(edits or {}):
        lm.run_with_hooks(torch.tensor([ids]), [hook], lambda n, a: got.setdefault(n, a.clone()))
    return got[hook][0]


# ------------------------------------------------------------------ generation and steering


def test_no_feature_and_strength_zero_give_exactly_the_default(served):
    ids = served.tokenize("The quick brown fox")
    kw = dict(n_tokens=12, temperature=0.8, seed=5, top_logprobs=4)
    for feats in ([], [SteerFeature("res", 3, 0.0), SteerFeature("0-mlp", 7, 0.0)]):
        default, steered = steer(served, ids, feats, **kw)
        assert len(default.ids) == 12
        assert steered.ids == default.ids and steered.logprobs == default.logprobs
        assert steered.top_ids == default.top_ids
        assert steered.top_logprobs == default.top_logprobs


def test_generation_is_seeded_and_greedy_is_the_argmax_without_cache(served):
    lm, ids = served.lm, served.tokenize("def add(a, b):")
    one = generate(lm, ids, n_tokens=10, temperature=1.0, seed=11)
    assert generate(lm, ids, n_tokens=10, temperature=1.0, seed=11) == one
    assert generate(lm, ids, n_tokens=10, temperature=1.0, seed=12).ids != one.ids
    greedy = generate(lm, ids, n_tokens=10, temperature=0, seed=0, top_logprobs=3)
    want_ids, want_lp = _greedy_without_cache(lm, ids, 10)
    assert greedy.ids == want_ids
    np.testing.assert_allclose(greedy.logprobs, want_lp, rtol=1e-5, atol=1e-5)
    for tok, top, lp in zip(greedy.ids, greedy.top_ids, greedy.top_logprobs, strict=True):
        assert top[0] == tok and lp == sorted(lp, reverse=True)


def test_generation_stops_at_a_stop_token_and_penalises_repeats(served):
    lm, ids = served.lm, served.tokenize("a a a a")
    free = generate(lm, ids, n_tokens=8, temperature=0, seed=0)
    stopped = generate(lm, ids, n_tokens=8, temperature=0, seed=0, stop_ids=(free.ids[2],))
    assert stopped.ids == free.ids[:free.ids.index(free.ids[2]) + 1]
    penalised = generate(lm, ids, n_tokens=8, temperature=0, seed=0, freq_penalty=-1.5)
    want_ids, want_lp = _greedy_without_cache(lm, ids, 8, penalty=-1.5)
    assert penalised.ids == want_ids and penalised.ids != free.ids
    # a negative penalty favours repeats; it changes the choice, not the log-probabilities
    np.testing.assert_allclose(penalised.logprobs, want_lp, rtol=1e-5, atol=1e-5)


def test_additive_steering_equals_adding_the_vector_by_hand(served):
    """At every position, prompt and generated (with the KV cache): the same tokens and
    log-probabilities, bit for bit, as a forward hook that adds strength x the direction."""
    lm, ids = served.lm, served.tokenize("It was a dark and stormy night")
    sae = served.sources["res"].sae
    kw = dict(n_tokens=10, temperature=0.9, seed=3, top_logprobs=3)
    _, steered = steer(served, ids, [SteerFeature("res", 5, 6.5)], **kw)
    v = sae.W_dec[5].detach()
    handle = _by_hand(_blocks(lm)[1], lambda x: x + 6.5 * v, pre=False)
    try:
        by_hand = generate(lm, ids, **kw)
        want_ids, want_lp = _greedy_without_cache(lm, ids, 6)
    finally:
        handle.remove()
    assert steered == by_hand
    _, steered_greedy = steer(served, ids, [SteerFeature("res", 5, 6.5)], n_tokens=6,
                              temperature=0, seed=0)
    assert steered_greedy.ids == want_ids
    np.testing.assert_allclose(steered_greedy.logprobs, want_lp, rtol=1e-5, atol=1e-5)


def test_steering_a_neuron_shifts_its_activation(served):
    lm, ids = served.lm, served.tokenize("x = 1")
    kw = dict(n_tokens=8, temperature=0.7, seed=1)
    _, steered = steer(served, ids, [SteerFeature("0-mlp", 9, -3.0)], **kw)
    handle = _by_hand(_down_proj(lm, 0), _shift(9, -3.0), pre=True)
    try:
        assert generate(lm, ids, **kw) == steered
    finally:
        handle.remove()
    clean = _capture(lm, ids, "blocks.0.mlp.hook_post")
    from workers.steering import steering_edits

    got = _capture(lm, ids, "blocks.0.mlp.hook_post",
                   steering_edits(served, [SteerFeature("0-mlp", 9, -3.0)], method="additive",
                                  normalize=False))
    torch.testing.assert_close(got[:, 9], clean[:, 9] - 3.0)
    assert torch.equal(torch.cat([got[:, :9], got[:, 10:]], 1),
                       torch.cat([clean[:, :9], clean[:, 10:]], 1))


@pytest.mark.parametrize("method", ["orthogonal", "cap"])
def test_orthogonal_sets_and_cap_limits_the_component_along_the_direction(served, method):
    from workers.steering import steering_edits

    lm, ids = served.lm, served.tokenize("The cat sat on the mat and looked around.")
    v = served.sources["res"].sae.W_dec[2].detach()
    clean = _capture(lm, ids, RESID)
    coef = clean @ v / (v @ v)
    s = float(coef.median())  # some positions above it, some below
    got = _capture(lm, ids, RESID, steering_edits(served, [SteerFeature("res", 2, s)],
                                                  method=method, normalize=False))
    after = got @ v / (v @ v)
    want = torch.full_like(coef, s) if method == "orthogonal" else coef.clamp(max=s)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    # the part orthogonal to v is untouched
    torch.testing.assert_close(got - after[:, None] * v, clean - coef[:, None] * v, rtol=1e-5,
                               atol=1e-5)
    if method == "cap":
        below = coef <= s
        assert below.any() and (~below).any()
        assert torch.equal(got[below], clean[below])


def test_normalize_steers_along_the_unit_direction(served):
    from workers.steering import steering_edits

    lm, ids = served.lm, served.tokenize("One two three")
    v = served.sources["res"].sae.W_dec[4].detach()
    clean = _capture(lm, ids, RESID)
    got = _capture(lm, ids, RESID, steering_edits(served, [SteerFeature("res", 4, 2.5)],
                                                  method="additive", normalize=True))
    delta = got - clean
    torch.testing.assert_close(delta, (2.5 * v / v.norm()).expand_as(delta), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(delta.norm(dim=-1).numpy(), 2.5, rtol=1e-5)


def test_steering_refuses_what_it_cannot_do(served):
    ids = served.tokenize("hi")
    kw = dict(n_tokens=2, temperature=0, seed=0)
    with pytest.raises(BadInput, match="no feature 40"):
        steer(served, ids, [SteerFeature("res", 40, 1.0)], **kw)
    with pytest.raises(BadInput, match="unknown steering method"):
        steer(served, ids, [SteerFeature("res", 1, 1.0)], method="multiply", **kw)
    with pytest.raises(TooLong, match="positions"):
        steer(served, ids, [], n_tokens=300, temperature=0, seed=0)
    sae = served.sources["res"].sae
    saved = sae.W_dec[0].clone()
    sae.W_dec.data[0] = 0
    try:
        with pytest.raises(BadInput, match="zero direction"):
            steer(served, ids, [SteerFeature("res", 0, 1.0)], normalize=True, **kw)
    finally:
        sae.W_dec.data[0] = saved


# ------------------------------------------------------------------ ablation


def _losses(lm, ids):
    with torch.inference_mode():
        logp = torch.log_softmax(lm.hf_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return logp, np.concatenate([[np.nan], -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])
                                 [:, 0].numpy()])


def _losses_without_column(lm, layer, index, ids):
    """_losses with the neuron's column of the down projection zeroed (restored after)."""
    w = _down_proj(lm, layer).weight
    saved = w.detach().clone()
    with torch.no_grad():
        (w[index] if lm.arch == "gpt2" else w[:, index]).zero_()  # Conv1D is [in, out]
    try:
        return _losses(lm, ids)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_zero_ablating_a_neuron_equals_zeroing_its_column_of_the_down_projection(served):
    lm, ids = served.lm, served.tokenize("import numpy as np\nprint(np.zeros(3))")
    res = ablate(served, ids, [Ablation("0-mlp", 11)], top=4)
    clean_logp, clean = _losses(lm, ids)
    np.testing.assert_array_equal(res.loss_clean, clean)
    ablated_logp, ablated = _losses_without_column(lm, 0, 11, ids)
    np.testing.assert_array_equal(res.loss_ablated, ablated)
    assert not np.array_equal(res.loss_ablated[1:], res.loss_clean[1:])
    # the moved tokens: the largest |ablated - clean| log-probabilities at each prediction
    delta = (ablated_logp - clean_logp)[:-1]
    for i in range(1, len(ids)):
        want = delta[i - 1].abs().topk(4)
        assert res.moved_ids[i].tolist() == want.indices.tolist()
        np.testing.assert_array_equal(res.moved_clean[i], clean_logp[i - 1, want.indices])
        np.testing.assert_array_equal(res.moved_ablated[i], ablated_logp[i - 1, want.indices])


def test_ablating_an_sae_feature_subtracts_its_activation_times_its_decoder_row(served):
    """The SAE's reconstruction error stays: exactly x - f_i(x) W_dec[i] at the hook point."""
    lm, ids = served.lm, served.tokenize("The rain in Spain stays mainly in the plain.")
    sae = served.sources["res"].sae
    fired = sae.encode(_capture(lm, ids, RESID))
    index = int(fired.sum(0).argmax())
    res = ablate(served, ids, [Ablation("res", index)])

    def by_hand(x):
        return x - sae.encode(x)[..., index:index + 1] * sae.W_dec[index]

    handle = _by_hand(_blocks(lm)[1], by_hand, pre=False)
    try:
        _, want = _losses(lm, ids)
    finally:
        handle.remove()
    np.testing.assert_array_equal(res.loss_ablated, want)
    assert not np.allclose(res.loss_ablated[1:], res.loss_clean[1:])


def test_ablating_a_feature_of_a_normalising_sae_changes_only_its_share(served):
    """For an SAE that rescales its input, the edited activation is the SAE's reconstruction
    with the feature at its new value, plus the untouched error."""
    lm, ids = served.lm, served.tokenize("for i in range(10): print(i)")
    sae, hook = served.sources["post"].sae, served.sources["post"].hook_name
    x = _capture(lm, ids, hook)
    f = sae.encode(x)
    index = int((f > 0).sum(0).argmax())
    got = _capture(lm, ids, hook, ablation_edits(served, [Ablation("post", index, 0.25)]))
    g = f.clone()
    g[:, index] = 0.25
    want = x - sae(x) + (sae.decode(g) * (x.norm(dim=-1, keepdim=True) / lm.d_mlp**0.5))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_neuron_held_at_a_value_reads_that_value(served):
    lm, ids = served.lm, served.tokenize("Hello there")
    got = _capture(lm, ids, "blocks.0.mlp.hook_post",
                   ablation_edits(served, [Ablation("0-mlp", 3, 1.5), Ablation("0-mlp", 8, -2.0)]))
    assert (got[:, 3] == 1.5).all() and (got[:, 8] == -2.0).all()


def test_ablation_refuses_what_it_cannot_do(served):
    with pytest.raises(BadInput, match="at least two tokens"):
        ablate(served, [1], [Ablation("0-mlp", 0)])
    with pytest.raises(BadInput, match="no feature"):
        ablate(served, [1, 2, 3], [Ablation("0-mlp", 10**6)])
    with pytest.raises(BadInput, match="vocabulary"):
        ablate(served, [1, 10**7], [Ablation("0-mlp", 0)])


# ------------------------------------------------------------------ patching


@pytest.fixture(scope="module")
def ioi(served):
    lm = served.lm
    clean, corrupted = served.tokenize(CLEAN), served.tokenize(CORRUPTED)
    answer, wrong = (served.tokenize(t)[-1] for t in (" Mary", " John"))
    return lm, clean, corrupted, answer, wrong


def _whole(hook_of, n):
    return [tuple(Site(hook_of(layer), position=p) for p in range(n)) for layer in range(2)]


@pytest.mark.parametrize("batch_size", [3, 64])
def test_patching_a_whole_layer_gives_one_and_nothing_gives_zero(ioi, batch_size):
    lm, clean, corrupted, a, w = ioi
    layers = _whole(lambda L: f"blocks.{L}.hook_resid_pre", len(clean))
    values, ld_clean, ld_corr, passes = run_patches(lm, clean, corrupted, a, w,
                                                    layers + [()], batch_size=batch_size)
    assert values.tolist() == [1.0, 1.0, 0.0]
    assert passes == math.ceil(3 / (batch_size - 2)) and ld_clean != ld_corr


def test_all_heads_of_a_layer_equal_its_attention_output(ioi):
    """Patched together, the heads' outputs give exactly the attention output's patch; and the
    head outputs at `attn.hook_z` through the output projection sum to the attention output."""
    lm, clean, corrupted, a, w = ioi
    heads = [tuple(Site(f"blocks.{L}.attn.hook_z", head=h) for h in range(lm.n_heads))
             for L in range(2)]
    attn = [(Site(f"blocks.{L}.hook_attn_out"),) for L in range(2)]
    values, *_ = run_patches(lm, clean, corrupted, a, w, heads + attn)
    assert values[:2].tolist() == values[2:].tolist()
    assert 0 < abs(values[0]) and values[0] != 1.0
    z = {}
    with lm.editing({"blocks.1.attn.hook_z": lambda x: z.setdefault("z", x.clone())}):
        out = _capture(lm, clean, "blocks.1.hook_attn_out")
    proj = _blocks(lm)[1].attn.c_proj if lm.arch == "gpt2" else _blocks(lm)[1].self_attn.o_proj
    w_o = proj.weight if lm.arch == "gpt2" else proj.weight.T  # [n_heads * d_head, d_model]
    per_head = [z["z"][0, :, h * lm.d_head:(h + 1) * lm.d_head] @ w_o[h * lm.d_head:
                                                                      (h + 1) * lm.d_head]
                for h in range(lm.n_heads)]
    bias = proj.bias if proj.bias is not None else 0.0
    torch.testing.assert_close(sum(per_head) + bias, out, rtol=1e-5, atol=1e-5)


def _by_hand_patch(lm, clean, corrupted, a, w, module, pre, select):
    """The normalised logit difference of one patch, unbatched, with hooks written here:
    select(x) is the part of the activation copied from the clean run."""
    def ld(ids, fn=None):
        handle = _by_hand(module, fn, pre=pre) if fn else None
        try:
            with torch.inference_mode():
                logits = lm.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        finally:
            if handle:
                handle.remove()
        return float(logits[a] - logits[w])

    saved = {}
    ld_clean = ld(clean, lambda x: saved.setdefault("x", x.clone()))

    def put(x):
        x = x.clone()
        select(x)[...] = select(saved["x"])
        return x

    return (ld(corrupted, put) - ld(corrupted)) / (ld_clean - ld(corrupted))


def test_sweep_values_match_unbatched_patches_by_hand(ioi):
    lm, clean, corrupted, a, w = ioi
    sw = sweep(lm, clean, corrupted, a, w, kinds=["resid", "heads", "mlp"], batch_size=7)
    n, first = len(clean), sw.first_diff
    assert first == next(i for i in range(n) if clean[i] != corrupted[i]) and 0 < first < n
    assert sw.resid.shape == (2, n) and sw.heads.shape == (2, lm.n_heads)
    assert sw.runs == 2 * (n - first) + 2 * lm.n_heads + 2
    assert sw.passes == math.ceil(sw.runs / 5)
    assert (sw.resid[:, :first] == 0).all()
    for layer, pos in [(0, first), (1, first), (1, n - 1), (0, n - 1)]:
        want = _by_hand_patch(lm, clean, corrupted, a, w, _blocks(lm)[layer], True,
                              lambda x, p=pos: x[:, p])
        assert sw.resid[layer, pos] == pytest.approx(want, rel=1e-4, abs=1e-5)
    dh = lm.d_head
    for layer, head in [(0, 1), (1, 3)]:
        attn = _blocks(lm)[layer].attn if lm.arch == "gpt2" else _blocks(lm)[layer].self_attn
        proj = attn.c_proj if lm.arch == "gpt2" else attn.o_proj
        want = _by_hand_patch(lm, clean, corrupted, a, w, proj, True,
                              lambda x, h=head: x[..., h * dh:(h + 1) * dh])
        assert sw.heads[layer, head] == pytest.approx(want, rel=1e-4, abs=1e-5)
    for layer in range(2):
        want = _by_hand_patch(lm, clean, corrupted, a, w, _blocks(lm)[layer].mlp, False,
                              lambda x: x)
        assert sw.mlp[layer] == pytest.approx(want, rel=1e-4, abs=1e-5)
    # what is not run is what running it gives: nothing
    before = [(Site(f"blocks.{L}.hook_resid_pre", position=p),) for L in range(2)
              for p in range(first)]
    values, *_ = run_patches(lm, clean, corrupted, a, w, before)
    assert (values == 0).all()
    again = sweep(lm, clean, corrupted, a, w, kinds=["resid"], batch_size=64)
    np.testing.assert_allclose(again.resid, sw.resid, rtol=1e-4, atol=1e-5)
    assert again.heads is None and again.mlp is None and again.passes == 1


def test_patching_refuses_what_it_cannot_do(ioi):
    lm, clean, corrupted, a, w = ioi
    with pytest.raises(BadInput, match="same number of tokens"):
        sweep(lm, clean, corrupted[:-1], a, w, kinds=["resid"])
    with pytest.raises(BadInput, match="same logit difference"):
        sweep(lm, clean, clean, a, w, kinds=["mlp"])
    with pytest.raises(BadInput, match="unknown patch kinds"):
        sweep(lm, clean, corrupted, a, w, kinds=["embed"])
    with pytest.raises(TooLong, match="patched runs"):
        sweep(lm, clean, corrupted, a, w, kinds=["resid", "heads"], max_runs=10)


# ------------------------------------------------------------------ the real default model


@pytest.mark.slow
def test_default_model_interventions_against_their_definitions():
    """SmolLM2-135M: no steering is the default exactly, additive steering is the hand-added
    vector, a zeroed neuron is its zeroed down-projection column, an ablated SAE feature is its
    subtracted decoder share; on the indirect-object prompts the model prefers the right name,
    a whole clean layer restores exactly 1 and no patch 0, and the heads of a layer patched
    together are its attention output."""
    from pathlib import Path

    from app.config import DEFAULT_MODEL

    lm = load_model(DEFAULT_MODEL, cache_dir=Path(__file__).resolve().parents[1] / "data" / "cache")
    sae = random_sae("topk", d_in=lm.d_model, d_sae=64, hook="blocks.15.hook_resid_post", seed=5)
    served = ServedModel(lm, {
        "15-mlp": ServedSource("15-mlp", "neurons", "blocks.15.mlp.hook_post", lm.d_mlp),
        "sae": ServedSource("sae", "sae", sae.cfg.hook_name, 64, encode=sae.encode, sae=sae)})
    ids = served.tokenize("The capital of France is")
    kw = dict(n_tokens=8, temperature=0.7, seed=4, top_logprobs=3)
    default, zero = steer(served, ids, [SteerFeature("15-mlp", 100, 0.0)], **kw)
    assert zero == default and steer(served, ids, [], **kw) == (default, default)
    _, steered = steer(served, ids, [SteerFeature("15-mlp", 100, 6.0)], **kw)
    handle = _by_hand(_down_proj(lm, 15), _shift(100, 6.0), pre=True)
    try:
        assert generate(lm, ids, **kw) == steered
    finally:
        handle.remove()

    text = served.tokenize("def add(a, b):\n    return a + b\n\nprint(add(1, 2))")
    res = ablate(served, text, [Ablation("15-mlp", 777)])
    np.testing.assert_array_equal(res.loss_ablated, _losses_without_column(lm, 15, 777, text)[1])
    f = sae.encode(_capture(lm, text, sae.cfg.hook_name))
    index = int(f.sum(0).argmax())
    res = ablate(served, text, [Ablation("sae", index)])
    handle = _by_hand(_blocks(lm)[15], lambda x: x - sae.encode(x)[..., index:index + 1]
                      * sae.W_dec[index], pre=False)
    try:
        _, want = _losses(lm, text)
    finally:
        handle.remove()
    np.testing.assert_array_equal(res.loss_ablated, want)

    clean, corrupted = served.tokenize(CLEAN), served.tokenize(CORRUPTED)
    a, w_ = served.tokenize(" Mary")[-1], served.tokenize(" John")[-1]
    whole = [tuple(Site(f"blocks.{L}.hook_resid_pre", position=p) for p in range(len(clean)))
             for L in (0, 15, 29)]
    heads = [tuple(Site(f"blocks.{L}.attn.hook_z", head=h) for h in range(lm.n_heads))
             for L in (9, 20)]
    attn = [(Site(f"blocks.{L}.hook_attn_out"),) for L in (9, 20)]
    values, ld_clean, ld_corr, _ = run_patches(lm, clean, corrupted, a, w_,
                                               whole + [()] + heads + attn)
    assert ld_clean > 1 and ld_corr < -1  # " Mary" after the clean prompt, " John" after the other
    assert values[:4].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert values[4:6].tolist() == values[6:8].tolist()
