"""Train a sparse autoencoder on one hook point of a model, streaming its activations.

Batches of sequences run through the model only as far as the hook point; their activations
(the BOS position left out) go through an in-memory shuffle buffer into Adam steps. Nothing is
cached on disk. Training happens in a normalized space (activations scaled so that their mean
norm is sqrt(d_in), which makes the sparsity coefficients and learning rates transfer between
models); the scale is folded into the saved weights, so the SAE reads raw activations and its
features are in the model's units. At the end the SAE is spliced into the model on held-out
sequences to measure the cross-entropy loss it recovers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.sae import SAE, SAEConfig, save_sae
from workers.sae_config import ARCHITECTURES
from workers.sae_eval import evaluate

log = logging.getLogger(__name__)

DEFAULT_K = 32
DEFAULT_COEFF = {"standard": 5.0, "jumprelu": 0.5}
DEFAULT_LR = {"topk": 2e-3, "standard": 1e-3, "jumprelu": 1e-3}
OUTLIER_NORM = 10.0
"""Activations with a norm above this many times the median (attention sinks, which in some
models reach 100x) are left out of training: a handful would otherwise dominate the loss."""
JUMPRELU_INIT_QUANTILE = 0.99
THRESHOLD_LR_MULT = 10.0  # thresholds move in log space, 10x faster than the weights


@dataclass
class TrainConfig:
    """One SAE training run. Saved into the SAE's cfg.json."""

    hook_name: str
    d_sae: int
    architecture: str = "topk"
    """topk (k active latents), standard (ReLU, L1 weighted by decoder norms) or jumprelu."""
    k: int | None = None
    """Active latents of a topk SAE (default 32)."""
    sparsity_coeff: float | None = None
    """L1 coefficient (standard, default 5) or L0 coefficient (jumprelu, default 0.5), both on the
    normalized activations."""
    lr: float | None = None
    batch_tokens: int = 512
    """Activations per Adam step."""
    buffer_tokens: int = 16384
    """Shuffle buffer: activations of many sequences mixed before they form batches."""
    passes: int = 2
    """Times each buffered activation is trained on. The model's forward pass costs far more
    than an SAE step, so on a small corpus a few passes buy much more training per forward."""
    max_tokens: int | None = None
    """Cap on the training tokens (sequences x seq_len); the default takes the whole dataset."""
    model_batch: int = 8
    """Sequences per forward pass of the model."""
    dead_tokens: int = 50_000
    """A latent that has not fired in this many tokens counts as dead."""
    aux_k_coeff: float = 1 / 32
    """Weight of the TopK auxiliary loss that makes dead latents model the residual."""
    bandwidth: float = 0.1
    """Width of the straight-through kernel of the JumpReLU thresholds."""
    eval_sequences: int = 16
    """Held-out sequences (the last ones) for the metrics and the spliced cross-entropy."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture == "relu":
            self.architecture = "standard"
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, "
                             f"got {self.architecture!r}")
        if self.architecture == "topk":
            self.k = DEFAULT_K if self.k is None else self.k
            if not 0 < self.k <= self.d_sae:
                raise ValueError(f"k must be in 1..{self.d_sae} (the features), got {self.k}")
            if self.sparsity_coeff is not None:
                raise ValueError("a topk SAE takes --k, not an L1 coefficient")
        elif self.k is not None:
            raise ValueError(f"k applies to topk SAEs only, not to {self.architecture}")
        for name in ("d_sae", "batch_tokens", "buffer_tokens", "passes", "model_batch",
                     "dead_tokens", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if (self.sparsity_coeff or 0) < 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError("the sparsity coefficient must be >= 0 and the lr > 0")

    @property
    def coeff(self) -> float:
        if self.sparsity_coeff is not None:
            return self.sparsity_coeff
        return DEFAULT_COEFF.get(self.architecture, 0.0)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.architecture]


class _JumpReLU(torch.autograd.Function):
    """h * (h > t); the threshold's gradient through a rectangle kernel of width bw."""

    @staticmethod
    def forward(ctx, h: Tensor, t: Tensor, bw: float) -> Tensor:
        ctx.save_for_backward(h, t)
        ctx.bw = bw
        return h * (h > t)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, t = ctx.saved_tensors
        near = ((h - t).abs() < ctx.bw / 2).to(g.dtype)
        return (h > t) * g, (-(t / ctx.bw) * near * g).sum(0), None


class _Step(torch.autograd.Function):
    """(h > t), the L0 count; same kernel for the threshold's gradient."""

    @staticmethod
    def forward(ctx, h: Tensor, t: Tensor, bw: float) -> Tensor:
        ctx.save_for_backward(h, t)
        ctx.bw = bw
        return (h > t).to(h.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, t = ctx.saved_tensors
        near = ((h - t).abs() < ctx.bw / 2).to(g.dtype)
        return None, (-(1 / ctx.bw) * near * g).sum(0), None


class Trainer:
    """Adam on one SAE. step(x [n, d_in]) on raw activations; finish() -> the SAE in raw units."""

    def __init__(self, cfg: TrainConfig, sample: Tensor, total_steps: int | None = None):
        """sample [n, d_in]: first activations, for the normalizing scale and b_dec's init."""
        self.cfg = cfg
        d_in, dev = sample.shape[1], sample.device
        sample = sample.float()
        norms = sample.norm(dim=-1)
        self.max_norm = OUTLIER_NORM * float(norms.median())
        sample = sample[norms <= self.max_norm]
        self.n_outliers = 0
        self.scale = float(d_in**0.5 / sample.norm(dim=-1).mean().clamp_min(1e-12))
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.d_sae, d_in, generator=gen).to(dev)
        w = w / w.norm(dim=1, keepdim=True) * (0.1 if cfg.architecture == "standard" else 1.0)
        self.W_enc = w.T.contiguous().requires_grad_()
        self.W_dec = w.clone().requires_grad_()
        self.b_enc = torch.zeros(cfg.d_sae, device=dev, requires_grad=True)
        self.b_dec = (sample * self.scale).mean(0).requires_grad_()
        groups = [{"params": [self.W_enc, self.b_enc, self.W_dec, self.b_dec], "lr_mult": 1.0}]
        if cfg.architecture == "jumprelu":  # start each latent firing on ~1% of the sample
            with torch.no_grad():
                h = (sample * self.scale - self.b_dec) @ self.W_enc
                t0 = torch.quantile(h, JUMPRELU_INIT_QUANTILE, dim=0).clamp_min(cfg.bandwidth)
            self.log_t = t0.log().requires_grad_()
            groups.append({"params": [self.log_t], "lr_mult": THRESHOLD_LR_MULT})
        self.opt = torch.optim.Adam(groups, lr=cfg.learning_rate)
        self.total_steps = total_steps
        self.steps = 0
        self.n_tokens = 0
        self.last = {"mse": float("nan"), "fvu": float("nan"), "l0": 0.0, "dead": 0.0}
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.int64, device=dev)

    def _lr_factor(self) -> float:
        """Linear warm-up over the first 5% of the steps and decay to 0 over the last 20%."""
        if not self.total_steps:
            return 1.0
        frac = self.steps / self.total_steps
        return min(1.0, (frac + 0.01) / 0.05, max(0.0, (1 - frac) / 0.2))

    def dead_mask(self, *, final: bool = False) -> Tensor:
        """Latents that have not fired in the last dead_tokens tokens; at the end of a run
        shorter than that (final), those that never fired."""
        window = min(self.cfg.dead_tokens, max(self.n_tokens, 1)) if final else self.cfg.dead_tokens
        return self.since_fired >= window

    def step(self, x: Tensor) -> dict[str, float]:
        """One Adam step on raw activations x [n, d_in]. Returns mse, fvu, l0, dead."""
        cfg = self.cfg
        x = x.float()
        keep = x.norm(dim=-1) <= self.max_norm
        if not bool(keep.all()):
            self.n_outliers += int((~keep).sum())
            x = x[keep]
            if x.shape[0] == 0:
                return self.last
        x = x * self.scale
        h = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        sparsity = x.new_zeros(())
        if cfg.architecture == "topk":
            top = h.topk(cfg.k, dim=-1, sorted=False)
            vals = top.values.relu()
            x_hat = F.embedding_bag(top.indices, self.W_dec, per_sample_weights=vals,
                                    mode="sum") + self.b_dec
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[top.indices[vals > 0]] = True
            l0 = (vals > 0).sum(-1).float().mean()
        else:
            if cfg.architecture == "jumprelu":
                t = self.log_t.exp()
                f = _JumpReLU.apply(h, t, cfg.bandwidth)
                sparsity = _Step.apply(h, t, cfg.bandwidth).sum(-1).mean()
            else:
                f = h.relu()
                sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
            x_hat = f @ self.W_dec + self.b_dec
            fired = (f > 0).any(0)
            l0 = (f > 0).sum(-1).float().mean()
        err = (x_hat - x).pow(2).sum(-1)
        loss = err.mean()
        if self.total_steps:  # sparsity penalty warm-up over the first 5% of the steps
            sparsity = sparsity * min(1.0, self.steps / (0.05 * self.total_steps))
        loss = loss + cfg.coeff * sparsity
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if cfg.architecture == "topk" and n_dead and cfg.aux_k_coeff > 0:
            k_aux = min(x.shape[1] // 2, n_dead)
            aux = h.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            resid = (x - x_hat).detach()
            aux_hat = F.embedding_bag(aux.indices, self.W_dec, per_sample_weights=aux.values.relu(),
                                      mode="sum")
            aux_loss = (aux_hat - resid).pow(2).sum(-1).mean()
            loss = loss + cfg.aux_k_coeff * min(1.0, n_dead / k_aux) * aux_loss

        for group in self.opt.param_groups:
            group["lr"] = cfg.learning_rate * group["lr_mult"] * self._lr_factor()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        unit = cfg.architecture != "standard"
        if unit:  # keep decoder rows on the unit sphere: drop the radial part of the gradient
            with torch.no_grad():
                g = self.W_dec.grad
                g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec
        self.opt.step()
        with torch.no_grad():
            if unit:
                self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
        self.steps += 1
        self.n_tokens += x.shape[0]
        with torch.no_grad():
            total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
            fvu = float(err.sum() / total)
        mse = float(err.detach().mean()) / (x.shape[1] * self.scale**2)  # in the model's units
        self.last = {"mse": mse, "fvu": fvu, "l0": float(l0.detach()),
                     "dead": float(self.dead_mask().float().mean())}
        return self.last

    @torch.no_grad()
    def finish(self, extra: dict | None = None) -> SAE:
        """The SAE on raw activations: feature values divided by the scale, unit decoder rows
        (for standard SAEs the decoder norms are folded into the encoder)."""
        cfg, s = self.cfg, self.scale
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        sae = SAE(SAEConfig(d_in=self.W_dec.shape[1], d_sae=cfg.d_sae, hook_name=cfg.hook_name,
                            architecture=cfg.architecture, k=cfg.k, extra=dict(extra or {})),
                  device=self.W_dec.device)
        sae.W_enc.copy_(self.W_enc * norms)
        sae.b_enc.copy_(self.b_enc * norms / s)
        sae.W_dec.copy_(self.W_dec / norms[:, None])
        sae.b_dec.copy_(self.b_dec / s)
        if sae.threshold is not None:
            sae.threshold.copy_(self.log_t.exp() * norms / s)
        return sae.requires_grad_(False)


# ------------------------------------------------------------------ streaming from a model
def model_activations(lm, tokens: Tensor, hook_name: str, *, batch_size: int, first: int
                      ) -> Iterator[Tensor]:
    """The activations at hook_name of every token from position `first` on: [n, d] per batch."""
    for b0 in range(0, tokens.shape[0], batch_size):
        got: list[Tensor] = []
        lm.run_with_hooks(tokens[b0:b0 + batch_size].to(lm.device), [hook_name],
                          lambda _name, act, got=got: got.append(act[:, first:]))
        yield got[0].reshape(-1, got[0].shape[-1]).float().clone()  # a normal tensor


def shuffled(chunks: Iterator[Tensor], *, buffer_tokens: int, batch_tokens: int, passes: int,
             generator: torch.Generator) -> Iterator[Tensor]:
    """Batches [batch_tokens, d] drawn from a buffer that is refilled half at a time."""
    buf: Tensor | None = None
    for chunk in chunks:
        buf = chunk if buf is None else torch.cat([buf, chunk])
        if buf.shape[0] >= buffer_tokens:
            buf = buf[torch.randperm(buf.shape[0], generator=generator).to(buf.device)]
            n_out = max(batch_tokens, buf.shape[0] // 2 // batch_tokens * batch_tokens)
            yield from _epochs(buf[:n_out], batch_tokens, passes, generator)
            buf = buf[n_out:]
    if buf is not None and buf.shape[0]:
        yield from _epochs(buf, batch_tokens, passes, generator)


def _epochs(x: Tensor, batch_tokens: int, passes: int, gen: torch.Generator) -> Iterator[Tensor]:
    for p in range(passes):
        if p:
            x = x[torch.randperm(x.shape[0], generator=gen).to(x.device)]
        yield from x.split(batch_tokens)


# ------------------------------------------------------------------ the run
def train_sae(lm, dataset, cfg: TrainConfig, out: str | Path, *, progress: bool = True
              ) -> dict[str, float]:
    """Train on `dataset` (its last cfg.eval_sequences sequences held out), write the SAELens
    layout and training_metrics.json to `out`, and return the metrics."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or remove it")
    lm.hook_shape_dim(cfg.hook_name)  # checks the hook point
    tokens = dataset.tokens
    n_seq, seq_len = tokens.shape
    first = 1 if dataset.bos_policy == "bos-prepended" else 0
    n_eval = min(cfg.eval_sequences, n_seq // 2)
    n_train = n_seq - n_eval
    if n_eval < 1:
        raise ValueError(f"dataset {dataset.slug} has {n_seq} sequence(s): too few to train and "
                         "evaluate an SAE")
    if cfg.max_tokens is not None:
        n_train = min(n_train, max(1, cfg.max_tokens // seq_len))
    train_tokens = n_train * (seq_len - first) * cfg.passes
    total_steps = math.ceil(train_tokens / cfg.batch_tokens)
    log.info("training a %s SAE (%d latents) on %s of %s: %d sequences (%d tokens x %d passes), "
             "%d held out", cfg.architecture, cfg.d_sae, cfg.hook_name, lm.slug, n_train,
             train_tokens // cfg.passes, cfg.passes, n_eval)

    gen = torch.Generator().manual_seed(cfg.seed)
    batches = shuffled(model_activations(lm, tokens[:n_train], cfg.hook_name,
                                         batch_size=cfg.model_batch, first=first),
                       buffer_tokens=cfg.buffer_tokens, batch_tokens=cfg.batch_tokens,
                       passes=cfg.passes, generator=gen)
    bar = tqdm(total=train_tokens, unit="tok", unit_scale=True, desc="train-sae",
               disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str("filling the shuffle buffer")
    trainer = None
    t0 = time.monotonic()
    try:
        for x in batches:
            if trainer is None:
                trainer = Trainer(cfg, x, total_steps)
            stats = trainer.step(x)
            bar.update(x.shape[0])
            if trainer.steps % 5 == 1 or trainer.steps == total_steps:
                bar.set_postfix(mse=f"{stats['mse']:.4g}", fvu=f"{stats['fvu']:.3f}",
                                L0=f"{stats['l0']:.1f}", dead=f"{stats['dead']:.1%}")
    finally:
        bar.close()
    seconds = time.monotonic() - t0
    dead_fraction = float(trainer.dead_mask(final=True).float().mean())
    sae = trainer.finish(extra={
        "model_name": lm.slug, "hook_head_index": None, "context_size": seq_len,
        "prepend_bos": bool(first), "dataset_path": dataset.source, "device": str(lm.device),
        "featurescope": {"dataset": dataset.slug, "train_config": asdict(cfg),
                         "activation_scale": trainer.scale, "steps": trainer.steps,
                         "outlier_norm": trainer.max_norm, "outliers_skipped": trainer.n_outliers,
                         "train_seconds": round(seconds, 1)}})
    log.info("trained %d steps in %.0f s; evaluating on %d held-out sequences", trainer.steps,
             seconds, n_eval)
    metrics = evaluate(lm, sae, tokens[n_seq - n_eval:], first=first, batch_size=cfg.model_batch)
    # every kept activation is trained on exactly `passes` times: count the distinct ones
    metrics.update(dead_fraction=dead_fraction, n_tokens_trained=trainer.n_tokens // cfg.passes)
    save_sae(sae, out, metrics=metrics)
    return metrics


def train_sae_on(model: str, dataset: str, cfg: TrainConfig, out: str | Path, *,
                 seq_len: int = 128, device: str = "cpu", cache_dir: Path | None = None,
                 progress: bool = True) -> dict[str, float]:
    """Load the model and the corpus (cfg.max_tokens of training plus the held-out sequences),
    train and write `out`; returns the metrics."""
    from workers.corpus import load_dataset
    from workers.loading import load_model

    torch.manual_seed(cfg.seed)
    lm = load_model(model, device=device, cache_dir=cache_dir)
    lm.hook_shape_dim(cfg.hook_name)  # an unknown hook point fails before the corpus is read
    cap = None if cfg.max_tokens is None else cfg.max_tokens + cfg.eval_sequences * seq_len
    ds = load_dataset(dataset, lm.tokenizer, seq_len=seq_len, max_tokens=cap,
                      cache_dir=cache_dir)
    return train_sae(lm, ds, cfg, out, progress=progress)


def cmd_train_sae(args, settings, *, device: str) -> int:
    """`featurescope train-sae`: parse the arguments, train, write --out and report."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out")
    arch = args.architecture or ("standard" if args.l1 is not None else "topk")
    passes = getattr(args, "passes", None)  # the CLI may not offer --passes
    cfg = TrainConfig(hook_name=args.hook, d_sae=args.features, architecture=arch, k=args.k,
                      sparsity_coeff=args.l1, lr=args.lr, max_tokens=args.max_tokens,
                      model_batch=args.batch_size, seed=args.seed,
                      **({"passes": passes} if passes else {}))
    m = train_sae_on(args.model, args.dataset, cfg, out, seq_len=args.seq_len, device=device,
                     cache_dir=settings.cache_dir, progress=not args.quiet)
    rec = m["loss_recovered"]
    print(f"wrote {out}: trained on {m['n_tokens_trained']} tokens x {cfg.passes} passes; "
          f"L0 {m['l0']:.1f}, variance explained {m['variance_explained']:.3f}, "
          f"dead {m['dead_fraction']:.1%}, mse {m['mse']:.4g}\n"
          f"cross-entropy: clean {m['ce_clean']:.4f}, SAE spliced {m['ce_spliced']:.4f}, "
          f"zero-ablated {m['ce_zero_ablation']:.4f}: loss recovered "
          + ("n/a" if rec is None else f"{rec:.1%}"))
    return 0
