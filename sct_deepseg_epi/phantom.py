"""A seeded digital phantom of an axial cervical-cord gradient-echo EPI series (numpy only).

Anatomy per slice: spinal cord (an ellipse that drifts along the cord's curve), the CSF
ring around it, the vertebral body in front, paraspinal muscle and subcutaneous fat,
air outside. Acquisition: partial-volume averaging from a finer grid, T2* blurring and
an N/2 (Nyquist) ghost along the phase-encoding axis, a bias field, breathing-like signal
and position changes over time, and Rician noise. The truth mask is where at least half
of a voxel is cord. Used by ``sct_deepseg_epi demo`` and by the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

SUPERSAMPLE = 4


@dataclass
class Phantom:
    image: nib.Nifti1Image   # 4D float32 (or 3D when n_volumes == 1)
    truth: nib.Nifti1Image   # 3D uint8 cord mask on the same grid
    truth_4d: np.ndarray     # (X, Y, Z, T) cord masks per volume (breathing moves the cord)


def _ellipse(xx, yy, cx, cy, ax, ay):
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _slice_anatomy(xx, yy, cx, cy, rng_params):
    """Tissue intensities (arbitrary units) and cord indicator on one fine axial grid (mm)."""
    cord_ax, cord_ay, csf_ax, csf_ay = rng_params
    img = np.zeros_like(xx)
    body = _ellipse(xx, yy, 0.0, 5.0, 46.0, 38.0)
    img[body] = 0.55                                      # subcutaneous fat ring (bright in GRE)
    img[_ellipse(xx, yy, 0.0, 5.0, 42.0, 34.0)] = 0.32    # muscle
    img[_ellipse(xx, yy, cx, cy + 16.0, 9.0, 7.5)] = 0.22  # vertebral body
    img[_ellipse(xx, yy, cx, cy + 16.0, 7.0, 5.5)] = 0.28  # marrow
    img[_ellipse(xx, yy, 0.0, 30.0, 12.0, 6.0)] = 0.0      # airway (trachea)
    img[_ellipse(xx, yy, cx, cy, csf_ax, csf_ay)] = 1.0    # CSF
    cord = _ellipse(xx, yy, cx, cy, cord_ax, cord_ay)
    img[cord] = 0.58
    return img, cord.astype(np.float32)


def make_phantom(shape: tuple[int, int, int] = (64, 64, 12), n_volumes: int = 8,
                 zooms: tuple[float, float, float] = (1.2, 1.2, 5.0), *, seed: int = 0,
                 snr: float = 25.0, ghost: float = 0.06, t2star_blur: float = 0.8,
                 axcodes: str = "LAS", cord_offset_mm: tuple[float, float] = (0.0, 0.0)) -> Phantom:
    """Build the phantom. ``axcodes`` sets the stored orientation (the affine says it)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    s = SUPERSAMPLE
    # fine-grid coordinates in mm, RAS: x left->right, y posterior->anterior
    fx = (np.arange(nx * s) + 0.5) / s * zooms[0] - nx * zooms[0] / 2
    fy = (np.arange(ny * s) + 0.5) / s * zooms[1] - ny * zooms[1] / 2
    xx, yy = np.meshgrid(fx, fy, indexing="ij")
    params = (rng.uniform(5.5, 7.0), rng.uniform(3.8, 4.8), rng.uniform(8.0, 9.5), rng.uniform(6.0, 7.5))
    phase = rng.uniform(0, 2 * np.pi)
    curve = [(cord_offset_mm[0] + 2.0 * np.sin(phase + 0.35 * k), cord_offset_mm[1] - 2.0 + 1.5 * np.cos(0.25 * k))
             for k in range(nz)]
    # smooth multiplicative bias field
    gx, gy = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    bias = 1.0 + 0.25 * (rng.uniform(-1, 1) * gx + rng.uniform(-1, 1) * gy) + 0.1 * gx * gy
    # T2* decay during the echo train blurs along phase encoding (y): an exponential kernel
    k = np.arange(-4, 5)
    kernel = np.exp(-np.abs(k) / max(t2star_blur, 1e-3)) if t2star_blur > 0 else (k == 0).astype(float)
    kernel /= kernel.sum()

    def down(a):  # partial-volume averaging to the acquired grid
        return a.reshape(nx, s, ny, s).mean(axis=(1, 3))

    data = np.zeros((nx, ny, nz, n_volumes), np.float32)
    truth = np.zeros((nx, ny, nz, n_volumes), np.uint8)
    sigma = 1.0 / snr
    for t in range(n_volumes):
        breath = np.sin(2 * np.pi * t / 4.3 + phase)
        dy = 0.4 * breath  # mm of AP cord motion with breathing
        for z in range(nz):
            cx, cy = curve[z]
            fine, cord = _slice_anatomy(xx, yy, cx, cy + dy, params)
            img = down(fine) * bias * (1.0 + 0.02 * breath)
            padded = np.pad(img, ((0, 0), (4, 4)))
            img = sum(w * padded[:, 4 + o:4 + o + ny] for o, w in zip(k, kernel))
            img = img + ghost * (1 if z % 2 else -1) * np.roll(img, ny // 2, axis=1) * (1 if t % 2 else 0.8)
            img = np.abs(img)
            noisy = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
            data[:, :, z, t] = noisy
            truth[:, :, z, t] = down(cord) >= 0.5
    data *= 1000.0

    # store in the requested orientation with an affine that says so
    to_target = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    ras_affine = np.diag(list(zooms) + [1.0])
    ras_affine[:3, 3] = [-(nx - 1) * zooms[0] / 2, -(ny - 1) * zooms[1] / 2 - 20.0, -(nz - 1) * zooms[2] / 2 + 40.0]
    # voxel index mapping from target array to RAS array, composed with the RAS affine
    affine = ras_affine @ inv_ornt_aff(to_target, (nx, ny, nz))
    stored = apply_orientation(data, to_target)
    stored_truth = apply_orientation(truth, to_target)
    img_data = stored[..., 0] if n_volumes == 1 else stored
    image = nib.Nifti1Image(img_data.astype(np.float32), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    if n_volumes > 1:
        image.header["pixdim"][4] = 2.0  # TR (s)
    # the reference mask: cord in the majority of volumes (what the temporal mean shows)
    ref = (stored_truth.mean(axis=-1) >= 0.5).astype(np.uint8)
    truth_img = nib.Nifti1Image(ref, affine)
    truth_img.header.set_qform(affine, code=1)
    truth_img.header.set_sform(affine, code=1)
    return Phantom(image, truth_img, stored_truth)
