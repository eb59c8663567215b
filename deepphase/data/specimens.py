"""Built-in phase specimens for simulations, the demo and tests (no extra packages needed).

These are procedural stand-ins with realistic structure; realistic projected potentials from abTEM
belong to the optional ``sim`` extra. Phases are in radians on the probe's real-space pixel grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DeepPhaseError, InputFileError, ShapeError, ValueRangeError

BUILTIN_SPECIMENS = ("twisted-hbn", "cameraman")


def _gaussian_blobs(shape, coords, weights, sigma):
    """Sum of Gaussians; separable per atom, accumulated in chunks to bound memory."""
    rows = np.arange(shape[0])[None, :]
    cols = np.arange(shape[1])[None, :]
    image = np.zeros(shape)
    for s in range(0, len(coords), 2048):
        c, w = coords[s : s + 2048], weights[s : s + 2048]
        gr = np.exp(-((rows - c[:, :1]) ** 2) / (2 * sigma**2)) * w[:, None]
        gc = np.exp(-((cols - c[:, 1:]) ** 2) / (2 * sigma**2))
        image += gr.T @ gc
    return image


def honeycomb_layer(shape, lattice_px: float, angle_deg: float, weights=(1.0, 0.8), vacancy_rate: float = 0.0,
                    sigma_px: float = 0.9, rng=None, origin=(0.0, 0.0)) -> np.ndarray:
    """One hBN-like honeycomb layer: two sublattices (B, N) of Gaussian atoms, optional vacancies."""
    rng = np.random.default_rng(rng)
    theta = np.deg2rad(angle_deg)
    a1 = lattice_px * np.array([np.cos(theta), np.sin(theta)])
    a2 = lattice_px * np.array([np.cos(theta + np.pi / 3), np.sin(theta + np.pi / 3)])
    extent = int(np.ceil(2 * max(shape) / lattice_px)) + 2
    i, j = np.meshgrid(np.arange(-extent, extent), np.arange(-extent, extent), indexing="ij")
    sites = np.asarray(origin) + i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    coords, w = [], []
    for k, weight in enumerate(weights):
        pos = sites + k * (a1 + a2) / 3
        keep = (pos[:, 0] > -4) & (pos[:, 0] < shape[0] + 4) & (pos[:, 1] > -4) & (pos[:, 1] < shape[1] + 4)
        coords.append(pos[keep])
        w.append(np.full(keep.sum(), weight))
    coords, w = np.concatenate(coords), np.concatenate(w)
    w = w * (rng.random(len(w)) >= vacancy_rate)
    return _gaussian_blobs(shape, coords, w, sigma_px)


def twisted_hbn(shape=(96, 96), lattice_px: float = 6.0, twist_deg: float = 4.0, phase_per_atom: float = 0.3,
                vacancy_rate: float = 0.03, seed: int = 0) -> np.ndarray:
    """A twisted hBN-like bilayer: two honeycomb layers rotated by ``twist_deg`` (a moiré), with vacancies.

    ``phase_per_atom`` is the peak phase of a nitrogen column in one layer (boron: 0.8 of it).
    """
    rng = np.random.default_rng(seed)
    layer1 = honeycomb_layer(shape, lattice_px, 0.0, vacancy_rate=vacancy_rate, rng=rng)
    layer2 = honeycomb_layer(shape, lattice_px, twist_deg, vacancy_rate=vacancy_rate, rng=rng,
                             origin=(shape[0] / 2, shape[1] / 2))
    return phase_per_atom * (layer1 + layer2)


def cameraman(shape=(96, 96), phase_max: float = 1.0) -> np.ndarray:
    """scikit-image's cameraman resized to ``shape``, as a phase in [0, phase_max]."""
    import skimage.data
    from skimage.transform import resize

    img = resize(skimage.data.camera().astype(float), shape, anti_aliasing=True)
    return phase_max * (img - img.min()) / (img.max() - img.min())


def builtin_specimen(name: str, shape=(96, 96), seed: int = 0) -> np.ndarray:
    """A built-in specimen by name (see ``BUILTIN_SPECIMENS``)."""
    if name == "twisted-hbn":
        return twisted_hbn(shape, seed=seed)
    if name == "cameraman":
        return cameraman(shape)
    raise DeepPhaseError(f"specimen: unknown built-in specimen {name!r}; expected one of {', '.join(BUILTIN_SPECIMENS)}")


def load_phase_image(path: str | Path, phase_max: float | None = None) -> np.ndarray:
    """A phase image from .npy (radians, used as is) or an image file (scaled to [0, phase_max])."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"object: file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            image = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputFileError(f"object: could not read {str(path)!r} as a .npy array (cut short, or not "
                                 f"a .npy file: {exc})") from exc
    else:
        try:
            import skimage.io

            image = skimage.io.imread(path)
        except Exception as exc:
            raise InputFileError(f"object: could not read {str(path)!r} as an image ({exc})") from exc
        if image.ndim == 3:
            from skimage.color import rgb2gray

            image = rgb2gray(image[..., :3])
        image = image.astype(float)
        image = (image - image.min()) / max(image.max() - image.min(), 1e-12) * (1.0 if phase_max is None else phase_max)
        phase_max = None
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ShapeError(f"object: expected a real 2-D phase image, got shape {image.shape} and dtype {image.dtype}")
    if not np.all(np.isfinite(image)):
        raise ValueRangeError(f"object: {str(path)!r} contains NaN or Inf")
    image = image.astype(np.float64)
    if phase_max is not None:
        image = (image - image.min()) / max(image.max() - image.min(), 1e-12) * phase_max
    return image
