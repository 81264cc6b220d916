"""Sample quality at digits scale: Frechet distance in the feature space of the zoo's
``digits-cnn`` classifier (its 128-d penultimate layer, the role Inception plays in FID) against
held-out real digits, and the classifier's accuracy on class-conditional samples; and sample
grids as PNG images."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from workers.engine.zoo import DigitsCNN


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Flattened samples in [-1, 1] -> classifier inputs [N, 1, 8, 8] in [0, 1]."""
    return ((x.clamp(-1, 1) + 1) / 2).reshape(-1, 1, 8, 8)


@torch.no_grad()
def features(cnn: DigitsCNN, images: torch.Tensor) -> torch.Tensor:
    return cnn.features(images)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets."""
    xa, xb = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = xa.mean(0), xb.mean(0)
    ca, cb = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
    # tr((C_a C_b)^(1/2)) = sum of sqrt(eig(C_a^(1/2) C_b C_a^(1/2))): symmetric, so stable
    # where features that never fire make the covariances singular
    w, v = np.linalg.eigh(ca)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cb @ half), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * trace_root)


@torch.no_grad()
def balanced(labels: torch.Tensor, per_class: int, classes: int = 10) -> torch.Tensor:
    """Indices of the first ``per_class`` samples of each class (all of a class with fewer), in
    class order: real data drawn as the generated samples are, so class balance alone does not
    move the distance between them."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)])


def class_accuracy(cnn: DigitsCNN, images: torch.Tensor, y: torch.Tensor) -> float:
    return float((cnn(images).argmax(1) == y).float().mean())


def png(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 2) -> bytes:
    """Greyscale PNG of ``images`` [N, 1, H, W] in [0, 1], ``rows`` rows, each pixel
    ``scale`` x ``scale``."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad), 255, dtype=np.uint8)
    big = images[:, 0].cpu().repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    pix = (255 * (1 - big.clamp(0, 1))).round().to(torch.uint8).numpy()  # dark ink on white
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * cell_h: pad + r * cell_h + h * scale,
               pad + c * cell_w: pad + c * cell_w + w * scale] = pix[i]
    raw = b"".join(b"\x00" + row.tobytes() for row in canvas)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", canvas.shape[1], canvas.shape[0], 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
