"""The GAN step as a component: G, D, both optimisers, the precision policy, the targets and the G EMA.

One iteration is two named phases (the objective, outside any loop; cf. stylegan2-ada ``training/loss.py``),
each timed and marked for the profiler:

* ``d_step``: G makes a batch from fresh noise; D sees the real batch and the detached fakes; BCE-with-logits
  with one-sided label smoothing on the real targets; D's optimiser steps.
  With ``--r1-gamma`` (R1, Mescheder et al. 2018) every ``--r1-every``-th D step also penalises the gradient of
  D's logits with respect to its real inputs: ``r1_gamma / 2 * r1_every * mean_i ||grad_x D(x_i)||^2`` joins the
  loss of that same backward pass (StyleGAN2's lazy regulariser, whose stylegan2-ada form is a separate ``Dreg``
  step; here it joins the main D step, as its non-lazy ``Dboth`` phase does). The iteration count fixes which
  steps, so a resumed run penalises the same steps. The penalty needs D's double backward, which compiled
  graphs lack: with ``--compile`` (or CUDA graphs) and R1, G is compiled and D runs eagerly
  (:attr:`GANStep.d_eager`).
* ``g_step``: the updated D scores the same fakes against "real" targets; D's parameters are frozen so no D
  weight-gradients are computed (and under DDP D does not all-reduce); G's optimiser steps.

With ``--diffaug`` every batch D sees (real and fake in ``d_step``, the fakes again in ``g_step``) goes through
:func:`~gantrain.engine.gan.diffaug.diff_augment` first, each time with fresh parameters from the noise stream; G's
images themselves (what ``d_step`` returns, samples, metrics) are never augmented. Off, nothing is drawn.

With ``--ema-decay`` or ``--ema-halflife`` an EMA copy of G's weights is updated after every iteration; samples,
metrics and checkpoints use it (:attr:`GANStep.generator`), with G's BatchNorm statistics copied each step or,
with ``--ema-bn standing``, statistics recomputed for the EMA weights when it is next used.

The Trainer wires this to data, checkpoints and outputs; ``gantrain bench`` times :meth:`GANStep.__call__` alone
and ``gantrain tune`` reads its generator. Statistics stay on the device (:class:`~gantrain.engine.train.stats.Stats`)
and are read at log time only: no host sync in the step.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gantrain.engine.config import Config, DataConfig, GanConfig, LossConfig, ModelConfig, OptimConfig, PerfConfig
from gantrain.engine.dist.runtime import DistInfo
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.diffaug import diff_augment, parse_policy
from gantrain.engine.gan.models import build_models
from gantrain.engine.gan.precision import PrecisionPolicy
from gantrain.engine.gan.sampling import STANDING_STATS_SEED_OFFSET, generate_images, sample_noise, standing_bn_stats_
from gantrain.engine.state import checkpoint as ckpt
from gantrain.engine.state.schema import generator_weights
from gantrain.engine.train.stats import PhaseTimer, Stats
from gantrain.kernels import conv


def make_adam(params, lr: float, betas: tuple[float, float], device: torch.device, fused: bool) -> torch.optim.Adam:
    """Fused Adam where the device supports it, else the multi-tensor (foreach) one."""
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=device.type in ("cuda", "cpu"))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` need no gradient inside the block (the G step needs only input-gradients of D)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


class GANStep:
    """G, D, their optimisers and the GAN objective for one config; ``step(real_uint8)`` trains one iteration.

    ``real_uint8``: a batch (B, C, S, S) of uint8 images (or DALI's floats in [-1, 1]) on ``device``; B must be
    ``data.batch_size`` (the targets are built for it).

    It takes its own config sections (the models, optimisers, objective, EMA and DiffAugment, performance
    switches, the batch's shape) and the seed of its weights and noise; :meth:`for_config` picks them from a whole
    config. Process-wide settings are the caller's (:func:`~gantrain.engine.dist.runtime.configure_runtime`).
    """

    def __init__(self, model: ModelConfig, optim: OptimConfig, loss: LossConfig, gan: GanConfig, perf: PerfConfig,
                 data: DataConfig, *, seed: int, device: torch.device, policy: PrecisionPolicy,
                 dist: DistInfo = DistInfo(), sync_bn: bool = False):
        self.model_cfg, self.optim_cfg, self.loss_cfg, self.gan_cfg, self.perf = model, optim, loss, gan, perf
        self.seed, self.batch_size, self.sync_bn = seed, data.batch_size, sync_bn
        self.device, self.policy, self.dist = device, policy, dist
        torch.manual_seed(seed)  # the same initial weights on every rank
        g, d = build_models(model, data.image_size, data.channels, perf.layer_impl)
        self.g, self.d = policy.prepare_model(g), policy.prepare_model(d)
        self.g_ema = copy.deepcopy(self.g).eval().requires_grad_(False) if gan.ema_on else None
        self.standing_stats = self.g_ema is not None and gan.ema_bn == "standing"
        self._ema_stats_stale = self.standing_stats  # recomputed when the EMA G is next used
        betas = (optim.beta1, optim.beta2)
        self.opt_g = make_adam(self.g.parameters(), optim.lr_g, betas, device, perf.fused_adam)
        self.opt_d = make_adam(self.d.parameters(), optim.lr_d, betas, device, perf.fused_adam)
        # R1 differentiates D's input gradient: compiled graphs have no double backward, so D stays eager
        self.d_eager = loss.r1_gamma > 0 and (perf.compile or perf.cuda_graphs)
        self.g_train, self.d_train = self._wrap(self.g), self._wrap(self.d, compile_ok=not self.d_eager)
        b = data.batch_size
        self.noise_gen = torch.Generator(device).manual_seed(seed * 7919 + 1 + dist.rank)
        self.diffaug = parse_policy(gan.diffaug)  # () when off
        self.real_target = torch.full((b,), 1.0 - loss.label_smoothing, device=device)
        self.fake_target = torch.zeros(b, device=device)
        self.gen_target = torch.ones(b, device=device)
        self.stats, self.timer = Stats(device), PhaseTimer(device)
        self.r1_gamma, self.r1_every = loss.r1_gamma, loss.r1_every
        self.iteration = 0  # iterations trained (a resume sets it): which D steps take the R1 penalty
        self.images_seen = 0  # images trained, all processes (a resume sets it): the EMA's ramp-up
        self.images_per_step = data.batch_size * dist.world_size
        self.layer_rewrites: dict | None = None  # which CPU layer rewrites run (set by its builder, parts.gan_part)

    @classmethod
    def for_config(cls, cfg: Config, device: torch.device, policy: PrecisionPolicy,
                   dist: DistInfo = DistInfo()) -> GANStep:
        """The step of a whole config: its sections, ``run.seed`` and ``dist.sync_bn``."""
        return cls(cfg.model, cfg.optim, cfg.loss, cfg.gan, cfg.perf, cfg.data, seed=cfg.run.seed, device=device,
                   policy=policy, dist=dist, sync_bn=cfg.dist.sync_bn)

    def _wrap(self, model: nn.Module, compile_ok: bool = True) -> nn.Module:
        """compile (where asked and ``compile_ok``), then DDP around it: the DDP(compile(model)) order."""
        perf = self.perf
        if self.dist.enabled and self.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn: SyncBatchNorm needs CUDA (it is not implemented for the CPU)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place
        if (perf.compile or perf.cuda_graphs) and compile_ok:
            mode = "reduce-overhead" if perf.cuda_graphs else perf.compile_mode
            model = torch.compile(model, mode=mode, dynamic=False)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():
                # D runs twice per step, so buffers must not be re-broadcast in forward; torch 2.13 deprecates
                # the flag but its replacement (forward_sync_buffers) still syncs at init, which is harmless
                # here, yet it is not in older torch releases that pyproject admits.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                model = DDP(model, device_ids=ids, broadcast_buffers=False)
        return model

    # ----- the phases ---------------------------------------------------------------------------------------
    def __call__(self, real_uint8: torch.Tensor) -> None:
        real = self.policy.prepare_batch(real_uint8)
        with self.timer.phase("d_step"):
            fake, loss_d, d_real, d_fake, r1 = self.d_step(real)
        with self.timer.phase("g_step"):
            loss_g = self.g_step(fake)
        self.policy.end_iteration()
        if self.g_ema is not None:
            self.update_ema()
        self.iteration += 1
        self.images_seen += self.images_per_step
        extra = {} if r1 is None else {"r1": r1}
        self.stats.add(loss_d=loss_d, loss_g=loss_g, d_real=d_real, d_fake=d_fake, **extra)

    @property
    def r1_due(self) -> bool:
        """Whether this iteration's D step takes the R1 penalty: iterations 0, N, 2N, ... with N = ``r1_every``."""
        return self.r1_gamma > 0 and self.iteration % self.r1_every == 0

    def d_step(self, real: torch.Tensor):
        """One D update. Returns the fakes, the D loss (BCE, without R1), mean D(x), mean D(G(z)) and the R1 term
        added to the loss (``r1_gamma / 2 * r1_every * mean ||grad_x D(x)||^2`` on an R1 step, else 0; its mean
        over steps is the penalty per step; None when R1 is off; under fp16, 0 on a step whose scaled gradient
        overflowed, which the scaler skips): 0-d tensors, no sync."""
        z = sample_noise(real.shape[0], self.model_cfg.nz, self.loss_cfg.noise, self.device, self.noise_gen)
        r1_due = self.r1_due
        with self.policy.autocast():
            fake = self.g_train(z)
            real_in = self.augment(real)
            if r1_due:
                real_in = real_in.detach().requires_grad_(True)
            logits_real = self.d_train(real_in).float()
            logits_fake = self.d_train(self.augment(fake.detach())).float()
        loss = (F.binary_cross_entropy_with_logits(logits_real, self.real_target)
                + F.binary_cross_entropy_with_logits(logits_fake, self.fake_target))
        total, r1 = loss, None
        if r1_due:
            with conv.no_weight_gradients():  # this backward wants x's gradient only
                grad = self.policy.input_grad(logits_real, real_in)
            r1 = (self.r1_gamma / 2 * self.r1_every) * r1_penalty(grad)
            total = loss + r1
            if self.policy.scaler.is_enabled():  # an fp16 overflow: the scaler skips this step; it logs as 0
                r1 = torch.where(torch.isfinite(r1), r1, torch.zeros_like(r1))
        elif self.r1_gamma > 0:
            r1 = torch.zeros((), device=self.device)
        self.opt_d.zero_grad(set_to_none=True)
        self.policy.backward_and_step(total, self.opt_d)
        return (fake, loss.detach(), torch.sigmoid(logits_real).mean().detach(),
                torch.sigmoid(logits_fake).mean().detach(), None if r1 is None else r1.detach())

    def g_step(self, fake: torch.Tensor) -> torch.Tensor:
        """One G update against the updated, frozen D; returns the G loss (0-d tensor)."""
        no_sync = self.d_train.no_sync() if isinstance(self.d_train, DDP) else contextlib.nullcontext()
        with frozen(self.d), no_sync:
            with self.policy.autocast():
                logits = self.d_train(self.augment(fake)).float()
            loss = F.binary_cross_entropy_with_logits(logits, self.gen_target)
            self.opt_g.zero_grad(set_to_none=True)
            self.policy.backward_and_step(loss, self.opt_g)
        return loss.detach()

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """D's view of a batch: DiffAugment with fresh parameters from the noise stream (on the device, saved in
        checkpoints, so runs and resumes stay exact), differentiable so G's gradient passes; ``images`` itself
        when ``--diffaug`` is off."""
        if not self.diffaug:
            return images
        return diff_augment(images, self.diffaug, self.noise_gen)

    @torch.no_grad()
    def update_ema(self) -> None:
        """The EMA step after G's update: lerp towards G by 1 - beta (:meth:`GanConfig.ema_beta`, a Python float
        of the images seen: no sync)."""
        decay = self.gan_cfg.ema_beta(self.images_per_step, self.images_seen + self.images_per_step)
        torch._foreach_lerp_(list(self.g_ema.parameters()), list(self.g.parameters()), 1.0 - decay)
        if self.standing_stats:
            self._ema_stats_stale = True  # computed when used, not every step
            return
        for ema_buf, buf in zip(self.g_ema.buffers(), self.g.buffers()):
            ema_buf.copy_(buf)

    # ----- sampling -----------------------------------------------------------------------------------------
    @property
    def generator(self) -> nn.Module:
        """The generator samples, metrics and checkpoints use: the EMA one when on, else G. With ``--ema-bn
        standing`` the EMA one's BatchNorm statistics are first recomputed for its weights if it changed since
        (:func:`~gantrain.engine.gan.sampling.standing_bn_stats_`: the EMA generator's forward on 2,048 noise vectors
        of their own seed, no sync with other ranks, nothing drawn from the training noise stream)."""
        if self.g_ema is None:
            return self.g
        if self._ema_stats_stale:
            self._standing_stats_(self.g_ema)
            self._ema_stats_stale = False
        return self.g_ema

    def _standing_stats_(self, generator: nn.Module) -> None:
        standing_bn_stats_(generator, self.model_cfg.nz, self.loss_cfg.noise, self.batch_size,
                           self.seed + STANDING_STATS_SEED_OFFSET, self.policy)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Images from :attr:`generator` (float32 in [-1, 1]); eval mode, BatchNorm statistics untouched."""
        return generate_images(self.generator, noise, self.policy)

    def sample_from(self, state: dict, noise: torch.Tensor, path: Path | str) -> torch.Tensor:
        """Images from the generator of a checkpoint's ``"gan"`` part ``state`` (as :meth:`state_dict` returns it;
        its EMA one when present and this run keeps one), loaded into a copy: this step's own weights stay as
        they are."""
        generator = copy.deepcopy(self.g_ema if self.g_ema is not None else self.g)
        ckpt.load_module_state(generator, generator_weights(state, self.g_ema is not None)[0], "generator", path)
        if self.standing_stats:  # the checkpoint may hold G's copied statistics (written with --ema-bn copy)
            self._standing_stats_(generator)
        return generate_images(generator, noise, self.policy)

    # ----- state --------------------------------------------------------------------------------------------
    def rng_state(self) -> dict:
        """This process's RNG streams (each DDP rank draws its own noise)."""
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def state_dict(self) -> dict:
        """Weights, optimiser and GradScaler states, and the RNG streams (the checkpoint's model part)."""
        rng = self.rng_state()
        state = {"generator": self.g.state_dict(), "discriminator": self.d.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "scaler": self.policy.scaler.state_dict(), "rng": rng}
        if self.g_ema is not None:
            state["generator_ema"] = self.generator.state_dict()  # its standing statistics when on
        return state

    def load_state_dict(self, state: dict, path: Path | str, step: int) -> list[str]:
        """Loads a checkpoint's ``"gan"`` part (what :meth:`state_dict` returns), keeping this config's optimiser
        hyperparameters.

        Returns the optimiser settings whose saved value differed ('lr(G) 0.0002 -> 0.001'). Raises
        :class:`CheckpointError` for non-finite or mismatched weights. ``step``: seeds a fresh noise stream
        when the saved one belongs to another process layout or device.
        """
        for key, what in (("generator", "generator"), ("discriminator", "discriminator"),
                          ("generator_ema", "EMA generator")):
            if key in state:
                ckpt.check_finite(state[key], what, path)
        ckpt.load_module_state(self.g, state["generator"], "generator", path)
        ckpt.load_module_state(self.d, state["discriminator"], "discriminator", path)
        if self.g_ema is not None:
            ckpt.load_module_state(self.g_ema, state.get("generator_ema", state["generator"]), "EMA generator", path)
            self._ema_stats_stale = self.standing_stats  # the saved statistics may be G's (another --ema-bn)
        changed = [*load_optimizer(self.opt_g, state["opt_g"], "G"), *load_optimizer(self.opt_d, state["opt_d"], "D")]
        if state["scaler"]:
            self.policy.scaler.load_state_dict(state["scaler"])
        self._load_rng(state["rng"], step)
        self.iteration = step
        return changed

    def _load_rng(self, rng: dict, step: int) -> None:
        ranks = rng.get("ranks")  # every DDP rank's streams: this rank continues its own, exactly
        if ranks is not None and len(ranks) == self.dist.world_size > 1 \
                and ranks[self.dist.rank]["noise"].numel() == self.noise_gen.get_state().numel():
            own = ranks[self.dist.rank]
            torch.set_rng_state(own["torch"])
            self.noise_gen.set_state(own["noise"])
            if "cuda" in own and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.device)
            return
        torch.set_rng_state(rng["torch"])
        if self.dist.world_size == 1 and rng["noise"].numel() == self.noise_gen.get_state().numel():
            self.noise_gen.set_state(rng["noise"])
        else:  # another world size or device: a fresh, still deterministic, per-rank stream
            self.noise_gen.manual_seed(self.seed * 7919 + 1 + self.dist.rank + step)
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    @torch.no_grad()
    def non_finite_weights(self, collective: bool) -> str:
        """'' when every parameter and buffer of G, D (and the EMA G) is finite, else how many are not, per model.
        One host sync (and under DDP one all-reduce when ``collective``): called at checkpoint time only."""
        models = [("generator", self.g), ("discriminator", self.d)]
        if self.g_ema is not None:
            models.append(("EMA generator", self.generator))  # with the statistics a checkpoint would store
        counts = torch.stack([
            sum((torch.count_nonzero(~torch.isfinite(t)) for t in [*m.parameters(), *m.buffers()]
                 if t.is_floating_point()), torch.zeros((), dtype=torch.int64, device=self.device))
            for _, m in models])
        if collective and self.dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(counts, op=tdist.ReduceOp.MAX)
        return ", ".join(f"{n:,} in the {name}" for (name, _), n in zip(models, counts.tolist()) if n)


def r1_penalty(grad: torch.Tensor) -> torch.Tensor:
    """The batch mean of the squared L2 norm of each sample's gradient, ``grad`` (B, ...) -> 0-d: R1's
    ``E ||grad_x D(x)||^2`` (Mescheder et al. 2018, eq. 9, without the gamma / 2), in fp32 or wider."""
    return grad.to(torch.promote_types(grad.dtype, torch.float32)).square().flatten(1).sum(1).mean()


def load_optimizer(opt: torch.optim.Optimizer, state: dict, name: str) -> list[str]:
    """Loads an optimiser's state but keeps the hyperparameters this run built it with.

    ``Optimizer.load_state_dict`` replaces every group setting (lr, betas, eps, fused, ...) with the saved
    ones, so a resumed run would silently train with the old learning rates. Returns the settings whose
    saved value differed, as 'lr(G) 0.0002 -> 0.001'.
    """
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    changed = []
    for group, settings in zip(opt.param_groups, fresh):
        for key, value in settings.items():
            if group.get(key) != value and f"{key}({name})" not in (c.split(" ")[0] for c in changed):
                changed.append(f"{key}({name}) {group.get(key)!r} -> {value!r}")
        group.update(settings)
        # The step counters live where the kernel wants them: on the parameter's device for fused and
        # capturable Adam, on the CPU otherwise (load_state_dict placed them for the saved settings).
        on_device = settings.get("fused") or settings.get("capturable")
        for param in group["params"]:
            step = opt.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[param]["step"] = step.to(param.device if on_device else "cpu", torch.float32)
    return changed


@torch.no_grad()
def replica_max_abs_diff(modules: list[nn.Module]) -> float:
    """Largest difference of any parameter between DDP ranks (0.0 when the replicas are in sync)."""
    import torch.distributed as tdist

    flat = torch.cat([p.detach().float().reshape(-1) for m in modules for p in m.parameters()])  # channels-last safe
    high, low = flat.clone(), flat.clone()
    tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
    return float((high - low).max())  # deliberate sync: once, at the end of the run
