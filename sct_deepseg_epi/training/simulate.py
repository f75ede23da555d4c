"""EPI simulator: anatomical volume + cord mask -> EPI-like thick-slice stack + partial-volume mask.

Labelled spinal cord EPI is scarce, anatomical T2*w/T2/MT volumes with manual masks are
not. This module turns one of those (in canonical RAS, see :mod:`sct_deepseg_epi.read`)
into what a gradient-echo EPI of the same neck could look like, randomised per sample
from a seeded :class:`numpy.random.Generator`. numpy only (no torch, no scipy).

The acquisition is modelled in this order (each step is one small function):

1. thick slices: the output slice (3-10 mm, optional gap) is the overlap-weighted average
   of the source slices it covers, for the image and the mask alike (partial volume); the
   stack stays inside the labelled range, is sometimes pinned to its top (C1-C2 at the top
   of the stack) and its end slices sometimes get a wider slab (partial-volume end slices);
2. contrast: intensities scaled to [0, ~1], random gamma, random cord/CSF contrast, and on
   some slices a local blur around the cord that weakens the cord/CSF contrast;
3. geometry: the field of view (FOV) is placed around the cord, often with the cord a
   few mm from an edge, rotated in-plane and optionally flipped left-right; a smooth
   displacement field along the phase-encoding (PE) axis distorts it, and the signal
   is multiplied by the Jacobian of that map (pile-up where it compresses, thinning where
   it stretches);
4. signal: susceptibility dropout blobs near the cord, coil bias field, slice-to-slice gain,
   and a coil-edge fall-off along z (signal, hence SNR, dropping towards one or both ends
   of the stack, applied after the noise level is set);
5. k-space: the image is sampled on a grid twice as fine as the acquisition, Fourier
   transformed and cropped to the acquisition matrix (the in-plane resolution, 0.8-2.5 mm),
   weighted by T2* decay along the PE echo train (blur along PE), given an odd/even line
   phase error (Nyquist N/2 ghost along PE), transformed back; complex Gaussian noise
   makes the magnitude Rician at the drawn SNR;
6. the mask follows the geometry only, and is area-averaged to the acquisition grid, so
   it is the true partial-volume fraction of cord in each EPI voxel.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class SimConfig:
    """Ranges the simulator draws from (uniformly unless said otherwise)."""

    inplane_mm: tuple[float, float] = (0.8, 2.5)
    thickness_mm: tuple[float, float] = (3.0, 10.0)
    gap_fraction: tuple[float, float] = (0.0, 0.3)
    n_slices: tuple[int, int] = (1, 6)
    fov_mm: tuple[float, float] = (40.0, 200.0)
    max_matrix: int = 160
    edge_prob: float = 0.35            # probability that the cord is placed near a FOV edge
    edge_mm: tuple[float, float] = (2.0, 10.0)  # cord centre to that edge
    rotation_deg: float = 25.0
    flip_lr_prob: float = 0.5
    pe_ap_prob: float = 0.75           # PE along anterior-posterior (else left-right)
    distortion_mm: tuple[float, float] = (0.0, 4.0)
    ghost_phase_rad: tuple[float, float] = (0.0, 0.5)
    t2star_decay: tuple[float, float] = (0.0, 1.5)  # log signal ratio first/last echo of the train
    dropout_prob: float = 0.4
    dropout_depth: tuple[float, float] = (0.3, 0.95)
    bias_strength: tuple[float, float] = (0.0, 0.7)
    slice_gain: float = 0.15
    snr: tuple[float, float] = (4.0, 40.0)
    gamma: tuple[float, float] = (0.6, 1.6)
    cord_contrast: tuple[float, float] = (0.75, 1.3)
    # 0.2.0: what failed on real data (cord at the stack's ends, C1-C2, weak contrast)
    anatomy_scale: tuple[float, float] = (0.9, 1.15)  # in-plane size of the anatomy (cord size varies)
    top_prob: float = 0.25             # stack pinned to the top of the labelled cord (C1-C2 on top)
    end_pv_prob: float = 0.3           # the stack's end slices get a wider slab (partial volume)
    end_pv_factor: tuple[float, float] = (1.2, 2.0)
    weak_contrast_prob: float = 0.15   # per slice: cord/CSF contrast washed out locally
    weak_contrast: tuple[float, float] = (0.4, 0.9)
    z_falloff_prob: float = 0.5        # coil-edge signal fall-off towards the stack's end(s)
    z_falloff_depth: tuple[float, float] = (0.2, 0.75)  # signal lost at the outer edge of the end slice
    z_falloff_mm: tuple[float, float] = (5.0, 30.0)     # e-folding length of that loss

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Source:
    """An anatomical volume in canonical RAS with its cord mask (same grid)."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    zooms: tuple[float, float, float]
    meta: dict = field(default_factory=dict)


@dataclass
class Simulated:
    """One simulated EPI stack: image and partial-volume mask (X, Y, Z) in RAS, voxel size."""

    image: np.ndarray
    mask: np.ndarray
    zooms: tuple[float, float, float]
    params: dict


def _u(rng: np.random.Generator, lo_hi) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def scale_intensity(img: np.ndarray) -> np.ndarray:
    """Scale so that the 99th percentile of the non-zero voxels is 1, clip negatives."""
    nz = img[img > 0]
    ref = float(np.percentile(nz, 99)) if nz.size else 1.0
    return np.clip(img / (ref if ref > 0 else 1.0), 0, None).astype(np.float32)


# ---------------------------------------------------------------- 2. thick slices
def thick_slice_weights(n_src: int, dz: float, centres_mm: np.ndarray, thickness,
                        lo_mm: np.ndarray | None = None, hi_mm: np.ndarray | None = None) -> np.ndarray:
    """(n_out, n_src) weights: the overlap of each output slab with each source slab, rows sum to 1.

    Source slice i covers [i*dz, (i+1)*dz) mm; output slice k covers centre +- thickness/2,
    or [lo_mm[k], hi_mm[k]) when given (a slab wider than nominal, e.g. at a stack's end).
    """
    lo_s = np.arange(n_src) * dz
    hi_s = lo_s + dz
    lo_o = (centres_mm - np.asarray(thickness) / 2 if lo_mm is None else np.asarray(lo_mm))[:, None]
    hi_o = (centres_mm + np.asarray(thickness) / 2 if hi_mm is None else np.asarray(hi_mm))[:, None]
    w = np.clip(np.minimum(hi_s[None], hi_o) - np.maximum(lo_s[None], lo_o), 0, None)
    s = w.sum(axis=1, keepdims=True)
    return (w / np.where(s > 0, s, 1)).astype(np.float32)


def labelled_range(mask: np.ndarray, dz: float) -> tuple[float, float]:
    """[lo, hi) in mm along z of the slices holding cord (the whole extent for an empty mask).

    Stacks stay inside it: beyond a manual mask's end the cord usually goes on unlabelled,
    and a slab straddling that end would teach "visible cord, no label"."""
    z = np.nonzero(mask.reshape(-1, mask.shape[2]).max(axis=0) > 0.5)[0]
    if not len(z):
        return 0.0, mask.shape[2] * dz
    return float(z[0] * dz), float((z[-1] + 1) * dz)


def thick_slices(src: Source, rng: np.random.Generator, cfg: SimConfig):
    """Average source slices into thick slices; returns image, mask (X, Y, n), thickness, params.

    Slice k = 0 is the most inferior (RAS). With ``top_prob`` the stack's top slab ends at
    the top of the labelled cord; with ``end_pv_prob`` the end slabs reach further out.
    """
    nz, dz = src.image.shape[2], src.zooms[2]
    lab_lo, lab_hi = labelled_range(src.mask, dz)
    extent = lab_hi - lab_lo
    thickness = max(_u(rng, cfg.thickness_mm), dz)
    thickness = min(thickness, extent)
    gap = _u(rng, cfg.gap_fraction) * thickness
    pitch = thickness + gap
    n_max = max(1, int((extent - thickness) // pitch) + 1)
    n = int(rng.integers(cfg.n_slices[0], cfg.n_slices[1] + 1))
    n = max(1, min(n, n_max))
    room = max(0.0, extent - thickness - (n - 1) * pitch)
    top = rng.random() < cfg.top_prob
    start = lab_lo + (room - float(rng.uniform(0, min(room, 0.5 * thickness))) if top else float(rng.uniform(0, room)))
    centres = start + thickness / 2 + pitch * np.arange(n)
    lo, hi = centres - thickness / 2, centres + thickness / 2
    end_pv = rng.random() < cfg.end_pv_prob
    if end_pv:  # wider slabs at the ends, reaching outwards (never past the labelled range)
        lo[0] = max(lab_lo, lo[0] - (_u(rng, cfg.end_pv_factor) - 1) * thickness)
        hi[-1] = min(lab_hi, hi[-1] + (_u(rng, cfg.end_pv_factor) - 1) * thickness)
    w = thick_slice_weights(nz, dz, centres, thickness, lo, hi)
    used = np.nonzero(w.sum(axis=0) > 0)[0]
    img = np.tensordot(src.image[:, :, used], w[:, used], axes=(2, 1))
    mask = np.tensordot(src.mask[:, :, used], w[:, used], axes=(2, 1))
    return img.astype(np.float32), mask.astype(np.float32), thickness, {
        "thickness_mm": thickness, "gap_mm": gap, "n_slices": n, "top_of_cord": bool(top), "end_pv": bool(end_pv)}


def box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window of a 2D array (edges: mean over the part inside)."""
    out = a.astype(np.float64)
    for ax in (0, 1):
        c = np.cumsum(np.pad(out, [(r + 1, r) if i == ax else (0, 0) for i in range(2)]), axis=ax)
        n = out.shape[ax]
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=ax)
        lo = np.take(c, np.arange(0, n), axis=ax)
        cnt = np.minimum(np.arange(n) + r, n - 1) - np.maximum(np.arange(n) - r, 0) + 1
        shape = [1, 1]
        shape[ax] = n
        out = (hi - lo) / cnt.reshape(shape)
    return out.astype(np.float32)


def weaken_contrast(img: np.ndarray, mask: np.ndarray, zooms, rng: np.random.Generator, cfg: SimConfig):
    """Per slice (p = ``weak_contrast_prob``): mix the cord's neighbourhood with a 7 mm box mean.

    The cord and its CSF ring then differ little, as on slices where CSF is thin, flows or
    is partial-volumed; the cord's shape (the mask) is unchanged. Returns the image and the
    number of slices changed.
    """
    r_small = max(1, int(round(3.0 / zooms[0])))
    r_big = max(1, int(round(6.0 / zooms[0])))
    out = img.copy()
    n = 0
    for k in range(img.shape[2]):
        if rng.random() >= cfg.weak_contrast_prob or not mask[:, :, k].any():
            continue
        a = _u(rng, cfg.weak_contrast)
        near = np.clip(3 * box_blur(mask[:, :, k], r_big), 0, 1)  # 1 on the cord, fading ~6 mm out
        out[:, :, k] = img[:, :, k] + a * near * (box_blur(img[:, :, k], r_small) - img[:, :, k])
        n += 1
    return out, n


def z_falloff(n: int, pitch: float, thickness: float, rng: np.random.Generator, cfg: SimConfig) -> tuple[np.ndarray, dict]:
    """Per-slice signal gain of a coil whose sensitivity drops towards the stack's end(s).

    gain = 1 - depth * exp(-d / L), d the distance (mm) of a slice's centre from the outer
    edge of the end slab; the end is the top (p 0.5), the bottom (0.3) or both (0.2).
    """
    if rng.random() >= cfg.z_falloff_prob:
        return np.ones(n, np.float32), {"z_falloff": None}
    depth, length = _u(rng, cfg.z_falloff_depth), _u(rng, cfg.z_falloff_mm)
    end = ("top", "bottom", "both")[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    d_bottom = thickness / 2 + pitch * np.arange(n)
    d_top = d_bottom[::-1]
    loss = np.zeros(n)
    if end in ("top", "both"):
        loss = np.maximum(loss, depth * np.exp(-d_top / length))
    if end in ("bottom", "both"):
        loss = np.maximum(loss, depth * np.exp(-d_bottom / length))
    return (1 - loss).astype(np.float32), {"z_falloff": [end, round(depth, 3), round(length, 1)]}


# ---------------------------------------------------------------- 3. geometry
def bilinear(stack: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Sample ``stack`` (X, Y, n) at voxel coordinates (px, py) (same shape); 0 outside."""
    nx, ny = stack.shape[:2]
    x0 = np.floor(px).astype(np.int64)
    y0 = np.floor(py).astype(np.int64)
    fx = (px - x0).astype(np.float32)[..., None]
    fy = (py - y0).astype(np.float32)[..., None]
    out = np.zeros(px.shape + stack.shape[2:], dtype=np.float32)
    for dx, wx in ((0, 1 - fx), (1, fx)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            vals = stack[np.clip(xi, 0, nx - 1), np.clip(yi, 0, ny - 1)]
            out += np.where(ok[..., None], vals, 0) * (wx * wy)
    return out


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, n_terms: int = 6) -> np.ndarray:
    """A smooth random field in [-1, 1]-ish: a few low-frequency cosines with random phases."""
    u = (np.arange(shape[0]) + 0.5)[:, None] / shape[0]
    v = (np.arange(shape[1]) + 0.5)[None, :] / shape[1]
    f = np.zeros(shape, dtype=np.float64)
    for _ in range(n_terms):
        kx, ky = rng.uniform(0, 1.5, size=2)
        f += rng.normal() * np.cos(2 * np.pi * (kx * u + ky * v) + rng.uniform(0, 2 * np.pi))
    m = np.abs(f).max()
    return (f / m if m > 0 else f).astype(np.float32)


def place_fov(cord_mm: float, extent_mm: float, fov: float, rng: np.random.Generator,
              edge: int | None, cfg: SimConfig) -> tuple[float, float]:
    """Along one axis: FOV length and where the cord centre sits inside it (mm from its low edge).

    ``edge`` is -1 / +1 to put the cord near the low / high edge, None for anywhere. The
    FOV never sticks out of the source volume: it is shortened on the far side instead
    (near an edge, the cord's distance to that edge is what matters).
    """
    fov = min(fov, extent_mm)
    room_lo, room_hi = cord_mm, extent_mm - cord_mm  # source extent below / above the cord
    if edge is None:
        pos = float(rng.uniform(0.2, 0.8)) * fov
        pos = max(min(pos, room_lo), fov - room_hi)
    elif edge < 0:
        pos = min(_u(rng, cfg.edge_mm), room_lo)
        fov = min(fov, pos + room_hi)
    else:
        d = min(_u(rng, cfg.edge_mm), room_hi)
        pos = min(fov - d, room_lo)
        fov = pos + d
    return max(fov, 4.0), float(np.clip(pos, 0.0, fov))


# ---------------------------------------------------------------- 5. k-space
def kspace_acquire(img: np.ndarray, matrix: tuple[int, int], pe_axis: int, rng: np.random.Generator,
                   cfg: SimConfig) -> tuple[np.ndarray, dict]:
    """Fine-grid magnitude (2Nx, 2Ny, n) -> complex image on the acquisition matrix (Nx, Ny, n).

    Cropping k-space sets the resolution; T2* decay along the echo train blurs along PE;
    an odd/even phase error (constant + linear along readout) makes the N/2 ghost.
    """
    nx, ny = matrix
    k = np.fft.fftshift(np.fft.fft2(img, axes=(0, 1)), axes=(0, 1))
    fx, fy = img.shape[:2]
    x0, y0 = (fx - nx) // 2, (fy - ny) // 2
    k = k[x0:x0 + nx, y0:y0 + ny] * (nx * ny / (fx * fy))
    npe = matrix[pe_axis]
    # T2* decay along the echo train: lines are acquired in order, the centre at the echo time
    decay = _u(rng, cfg.t2star_decay)
    t = (np.arange(npe) - npe / 2) / npe  # -0.5 .. 0.5 of the train
    wpe = np.exp(-decay * t).astype(np.float32)
    shape = [1, 1, 1]
    shape[pe_axis] = npe
    k = k * wpe.reshape(shape)
    # Nyquist ghost: odd PE lines get phase phi(x) along readout (hybrid space)
    phi0 = _u(rng, cfg.ghost_phase_rad) * rng.choice([-1, 1])
    phi1 = float(rng.normal(0, 0.3)) * abs(phi0)
    ro_axis = 1 - pe_axis
    hyb = np.fft.ifft(np.fft.ifftshift(k, axes=ro_axis), axis=ro_axis)
    x = (np.arange(matrix[ro_axis]) - matrix[ro_axis] / 2) / matrix[ro_axis]
    phase = np.exp(1j * (phi0 + phi1 * x))
    odd = (np.arange(npe) % 2 == 1)
    if pe_axis == 1:
        hyb[:, odd] *= phase[:, None, None]
    else:
        hyb[odd, :] *= phase[None, :, None]
    k = np.fft.fftshift(np.fft.fft(hyb, axis=ro_axis), axes=ro_axis)
    out = np.fft.ifft2(np.fft.ifftshift(k, axes=(0, 1)), axes=(0, 1))
    return out, {"t2star_decay": decay, "ghost_phase_rad": phi0}


def area_downsample2(a: np.ndarray) -> np.ndarray:
    """Average 2x2 blocks of the first two axes (their sizes are even)."""
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


# ---------------------------------------------------------------- the whole chain
def simulate(src: Source, rng: np.random.Generator, cfg: SimConfig = SimConfig()) -> Simulated:
    """Draw one EPI-like stack from ``src``. Deterministic for a given generator state."""
    p: dict = {"source": src.name}
    if not src.meta.get("scaled"):
        src = Source(src.name, scale_intensity(src.image), src.mask, src.zooms, {**src.meta, "scaled": True})
    img3, mask3, thickness, tp = thick_slices(src, rng, cfg)
    gamma = _u(rng, cfg.gamma)
    img3 = img3 ** gamma
    p.update(tp, gamma=gamma)
    contrast = _u(rng, cfg.cord_contrast)
    img3 = img3 * (1 + (contrast - 1) * mask3)
    img3, n_weak = weaken_contrast(img3, mask3, src.zooms, rng, cfg)
    p.update(cord_contrast=contrast, weak_contrast_slices=n_weak)

    # ---- geometry: output frame -> source mm
    zx, zy = src.zooms[:2]
    ext = (img3.shape[0] * zx, img3.shape[1] * zy)
    m2 = mask3.sum(axis=2)
    if m2.sum() > 0:
        ii, jj = np.nonzero(m2 > 0.5 * m2.max())
        cord = ((ii.mean() + 0.5) * zx, (jj.mean() + 0.5) * zy)
    else:
        cord = (ext[0] / 2, ext[1] / 2)
    res = _u(rng, cfg.inplane_mm)
    edge_axis, edge_side = None, None
    if rng.random() < cfg.edge_prob:
        edge_axis, edge_side = int(rng.integers(0, 2)), int(rng.choice([-1, 1]))
    fov, pos = [], []
    for ax in range(2):
        f, q = place_fov(cord[ax], ext[ax], _u(rng, cfg.fov_mm), rng, edge_side if ax == edge_axis else None, cfg)
        fov.append(f)
        pos.append(q)
    matrix = [max(4, min(cfg.max_matrix, int(round(f / res)))) for f in fov]
    matrix = [m + (m % 2) for m in matrix]  # even: the N/2 ghost lands exactly half a FOV away
    fov = [m * res for m in matrix]
    pos = [min(q, f) for q, f in zip(pos, fov)]
    w = res / 2
    fine = (2 * matrix[0], 2 * matrix[1])
    ox = (np.arange(fine[0]) + 0.5) * w - pos[0]
    oy = (np.arange(fine[1]) + 0.5) * w - pos[1]
    gx, gy = np.meshgrid(ox, oy, indexing="ij")
    pe_axis = 1 if rng.random() < cfg.pe_ap_prob else 0
    amp = _u(rng, cfg.distortion_mm)
    disp = amp * smooth_field(fine, rng, 4)
    # pile-up: intensity times the Jacobian of the map observed -> true position
    dd = np.gradient(disp, w, axis=pe_axis)
    jac = np.clip(1 - dd, 0.25, 4.0)
    if pe_axis == 1:
        gy = gy - disp
    else:
        gx = gx - disp
    flip = rng.random() < cfg.flip_lr_prob
    if flip:
        gx = -gx
    theta = math.radians(float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)))
    scale = _u(rng, cfg.anatomy_scale)
    c, s = math.cos(theta) / scale, math.sin(theta) / scale
    sx = cord[0] + c * gx - s * gy
    sy = cord[1] + s * gx + c * gy
    px, py = sx / zx - 0.5, sy / zy - 0.5
    fimg = bilinear(img3, px, py) * jac[..., None]
    fmask = bilinear(mask3, px, py)
    p.update(inplane_mm=res, matrix=list(matrix), fov_mm=[round(f, 1) for f in fov], pe_axis=pe_axis,
             distortion_mm=amp, flip_lr=bool(flip), rotation_deg=math.degrees(theta), anatomy_scale=scale,
             edge=None if edge_axis is None else [edge_axis, edge_side])

    # ---- signal: dropout, bias, slice gain
    n = img3.shape[2]
    cx, cy = pos[0] + 0.0, pos[1] + 0.0  # cord position in the output frame (mm)
    fx = (np.arange(fine[0]) + 0.5) * w
    fy = (np.arange(fine[1]) + 0.5) * w
    X, Y = np.meshgrid(fx, fy, indexing="ij")
    drop = np.ones(fine + (n,), dtype=np.float32)
    n_drop = 0
    for k in range(n):
        if rng.random() < cfg.dropout_prob:
            n_drop += 1
            bx = cx + rng.normal(0, 8)
            by = cy + rng.normal(6, 8)  # mostly anterior of the cord: vertebral bodies, discs
            sig = rng.uniform(3, 12)
            depth = _u(rng, cfg.dropout_depth)
            drop[..., k] *= 1 - depth * np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * sig ** 2))
    bias_s = _u(rng, cfg.bias_strength)
    bias = np.exp(bias_s * smooth_field(fine, rng, 3) + bias_s * rng.normal(0, 0.7) * (Y / max(fov[1], 1) - 0.5))
    gains = np.exp(rng.normal(0, cfg.slice_gain, size=n)).astype(np.float32)
    fimg = fimg * drop * bias[..., None].astype(np.float32) * gains
    p.update(dropout_slices=n_drop, bias_strength=bias_s)

    # ---- k-space, noise
    cimg, kp = kspace_acquire(fimg, tuple(matrix), pe_axis, rng, cfg)
    p.update(kp)
    mask = area_downsample2(fmask)
    mag = np.abs(cimg)
    ref = float(np.percentile(mag[mask > 0.5], 50)) if np.any(mask > 0.5) else float(np.percentile(mag, 90))
    snr = float(np.exp(rng.uniform(np.log(cfg.snr[0]), np.log(cfg.snr[1]))))
    sigma = max(ref, 1e-6) / snr
    # coil fall-off after the noise level is set: the end slices lose signal, hence SNR
    zgain, zp = z_falloff(n, tp["thickness_mm"] + tp["gap_mm"], thickness, rng, cfg)
    cimg = cimg * zgain
    p.update(zp)
    noisy = cimg + rng.normal(0, sigma, cimg.shape) + 1j * rng.normal(0, sigma, cimg.shape)
    out = np.abs(noisy).astype(np.float32) * 1000.0
    p["snr"] = snr
    return Simulated(out, np.clip(mask, 0, 1).astype(np.float32), (res, res, thickness), p)
