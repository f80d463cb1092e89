"""The reference the engine is measured against: a plain PyTorch DCGAN loop in the tutorials' style.

Eager fp32, NCHW; a torch DataLoader whose dataset converts each image ToTensor-style (PIL image, resize,
scale to [0, 1], normalise with mean 0.5 / std 0.5) in worker processes; D ends in a Sigmoid and the loss
is BCELoss; G's step backpropagates through D's weights too; ``.item()`` every step for the log. This is
what users write from the tutorials, and what ``gantrain bench`` reports speed-ups against.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gantrain.engine import Config, build_models, sample_noise


def plain_loop_omits(cfg: Config) -> list[str]:
    """The settings of ``cfg`` this loop does not implement, in words (it trains the recipe without them): the
    bench says so in one line, since gantrain's step does apply them."""
    return [text for applies, text in ((cfg.gan.ema_on, f"generator {cfg.gan.ema_words()}"),
                                       (bool(cfg.gan.diffaug), f"DiffAugment {','.join(cfg.gan.diffaug)}"),
                                       (cfg.loss.r1_gamma > 0, cfg.loss.r1_words()),
                                       (cfg.data.hflip, "horizontal flips")) if applies]


class ToTensorDataset(Dataset):
    """Per-item preprocessing like torchvision's Resize + ToTensor + Normalize((0.5,), (0.5,))."""

    def __init__(self, images_uint8: torch.Tensor, size: int):
        self.images = images_uint8.numpy()
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        array = self.images[i]
        pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
        if pil.size != (self.size, self.size):
            pil = pil.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - 0.5) / 0.5


class BaselineGAN:
    """The tutorial training step, kept deliberately plain."""

    def __init__(self, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.run.seed)
        g, d = build_models(cfg.model, cfg.data.image_size, cfg.data.channels, impl="aten")  # plain convolutions
        self.g, self.d = g.to(device), nn.Sequential(d, nn.Sigmoid()).to(device)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.optim.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.optim.lr_d, betas=betas)
        self.criterion = nn.BCELoss()
        self.cfg, self.device = cfg, device

    def step(self, real: torch.Tensor) -> tuple[float, float]:
        real = real.to(self.device)
        b = real.size(0)
        real_label = torch.full((b,), 1.0 - self.cfg.loss.label_smoothing, device=self.device)
        fake_label = torch.full((b,), 0.0, device=self.device)
        self.d.zero_grad()
        err_real = self.criterion(self.d(real).view(-1), real_label)
        err_real.backward()
        noise = sample_noise(b, self.cfg.model.nz, self.cfg.loss.noise, self.device)
        fake = self.g(noise)
        err_fake = self.criterion(self.d(fake.detach()).view(-1), fake_label)
        err_fake.backward()
        self.opt_d.step()
        self.g.zero_grad()
        err_g = self.criterion(self.d(fake).view(-1), torch.full((b,), 1.0, device=self.device))
        err_g.backward()
        self.opt_g.step()
        return (err_real + err_fake).item(), err_g.item()


def baseline_batches(images_uint8: torch.Tensor, cfg: Config, num_workers: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches from a DataLoader, epoch after epoch."""
    loader = DataLoader(ToTensorDataset(images_uint8, cfg.data.image_size), batch_size=cfg.data.batch_size,
                        shuffle=True, drop_last=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
    while True:
        yield from loader


def build_baseline(cfg: Config, device: torch.device, num_workers: int) -> tuple[BaselineGAN, Iterator[torch.Tensor], int]:
    """The tutorial loop's model and endless batches for ``cfg``'s data, and the images of one of its epochs
    (``drop_last``: whole batches only): what the speed rows time and the to-quality bench trains."""
    from gantrain.engine import load_images

    images = load_images(cfg.data.dataset, cfg.data.data_root, cfg.data.image_size, cfg.data.channels,
                         limit=cfg.data.limit, synthetic_size=cfg.data.synthetic_size, seed=cfg.run.seed)
    model = BaselineGAN(cfg, device)
    batches = baseline_batches(images, cfg, num_workers, cfg.run.seed)
    return model, batches, len(images) - len(images) % cfg.data.batch_size
