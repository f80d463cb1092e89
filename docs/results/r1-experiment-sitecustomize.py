"""An experiment, not part of gantrain (kept as the record of the runs it made; gantrain now has R1 itself,
`--r1-gamma`, docs/results/to-quality-fashion32-r1.md; this patch fits the d_step of commit 4009626, not later ones): R1 (Mescheder et al. 2018, a zero-centred gradient penalty on D's real
inputs, gamma/2 * mean ||grad_x D(x)||^2) added to GANStep.d_step, lazily (every R1_EVERY-th D step, weighted by
R1_EVERY, as stylegan2-ada's lazy regularisation). Python imports a module named sitecustomize from sys.path at
start-up, so copied under that name into a folder of its own on PYTHONPATH it patches every process, the bench's
workers included:

    mkdir -p /tmp/r1 && cp docs/results/r1-experiment-sitecustomize.py /tmp/r1/sitecustomize.py
    PYTHONPATH=/tmp/r1 R1_GAMMA=1 R1_EVERY=4 gantrain bench --to-quality --data-root ../shared/datasets \
        --contender "fashion32-tuned batch_size=32 layer_impl=aten" --seeds 1 --eval-every-epochs 0.25

(layer_impl=aten: the fast layers' custom gradients have no double backward). Without R1_GAMMA it changes
nothing. Figures: docs/results/to-quality-fashion32-screens.md."""
import os
if os.environ.get("R1_GAMMA"):
    import torch
    import torch.nn.functional as F
    from gantrain.engine.gan import step as _step
    from gantrain.engine.gan.sampling import sample_noise

    GAMMA = float(os.environ["R1_GAMMA"]); EVERY = int(os.environ.get("R1_EVERY", "1"))

    def d_step(self, real):
        self._r1_count = getattr(self, "_r1_count", 0) + 1
        lazy = self._r1_count % EVERY == 0
        z = sample_noise(real.shape[0], self.model_cfg.nz, self.loss_cfg.noise, self.device, self.noise_gen)
        real_in = self.augment(real)
        if lazy:
            real_in = real_in.detach().requires_grad_(True)
        with self.policy.autocast():
            fake = self.g_train(z)
            logits_real = self.d_train(real_in).float()
            logits_fake = self.d_train(self.augment(fake.detach())).float()
        loss = (F.binary_cross_entropy_with_logits(logits_real, self.real_target)
                + F.binary_cross_entropy_with_logits(logits_fake, self.fake_target))
        if lazy:
            (grad,) = torch.autograd.grad(logits_real.sum(), real_in, create_graph=True)
            loss = loss + (GAMMA / 2) * EVERY * grad.float().square().sum([1, 2, 3]).mean()
        self.opt_d.zero_grad(set_to_none=True)
        self.policy.backward_and_step(loss, self.opt_d)
        return fake, loss.detach(), torch.sigmoid(logits_real).mean().detach(), torch.sigmoid(logits_fake).mean().detach()

    _step.GANStep.d_step = d_step
