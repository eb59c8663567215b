"""The on-the-fly training stream: random phase objects → noisy diffraction amplitudes and targets.

Nothing is stored on disk. Batches are simulated on the device of the model (so a GPU never waits
for the CPU) from a seeded generator: the same seed and epoch give the same batches, which is what
makes ``--resume`` continue exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..physics.forward import as_complex_tensor, diffraction_amplitude, diffraction_intensity, incident_counts, poisson_counts
from ..physics.geometry import Geometry, crop_window, upsample_nearest
from .phase_objects import CorpusConfig, random_phase_objects


@dataclass
class Batch:
    amplitude: torch.Tensor  # (B, 1, n, n): sqrt(counts)
    target: torch.Tensor  # (B, 1, out, out): phase of the central crop, upsampled
    phase: torch.Tensor  # (B, n, n): the whole phase window


class TrainingStream:
    """Simulated training pairs for one probe, geometry, corpus and dose.

    Parameters
    ----------
    probe : complex array (n, n)
    geometry : Geometry
    corpus : CorpusConfig
    dose : float or (float, float)
        Incident electrons per pattern; a pair ``(lo, hi)`` draws each pattern's dose log-uniformly.
    device : torch device for the simulation.
    """

    def __init__(self, probe: np.ndarray, geometry: Geometry, corpus: CorpusConfig, dose, device="cpu"):
        self.geometry = geometry
        self.corpus = corpus
        self.dose = dose
        self.device = torch.device(device)
        self.probe = as_complex_tensor(probe, self.device)
        self.probe_counts = incident_counts(probe)

    def batch(self, size: int, gen: torch.Generator) -> Batch:
        n = self.geometry.n_px
        phase = random_phase_objects(size, n, gen, self.corpus, self.device)
        intensity = diffraction_intensity(self.probe, phase)
        if isinstance(self.dose, (tuple, list)):
            lo, hi = np.log(self.dose[0]), np.log(self.dose[1])
            dose = torch.exp(lo + (hi - lo) * torch.rand(size, generator=gen, device=self.device))[:, None, None]
        else:
            dose = float(self.dose)
        counts = poisson_counts(intensity, dose, self.probe_counts, gen)
        target = upsample_nearest(crop_window(phase, self.geometry), self.geometry.upsample)
        return Batch(diffraction_amplitude(counts)[:, None], target[:, None], phase)

    def generator(self, seed: int, epoch: int = 0) -> torch.Generator:
        """A generator whose state depends only on (seed, epoch): epochs can be replayed exactly."""
        return torch.Generator(device=self.device).manual_seed(int(seed) * 1_000_003 + int(epoch))

    def epoch(self, seed: int, epoch: int, steps: int, batch_size: int):
        """Yield ``steps`` batches of epoch ``epoch``."""
        gen = self.generator(seed, epoch)
        for _ in range(steps):
            yield self.batch(batch_size, gen)

    def fixed_set(self, seed: int, size: int, batch_size: int = 256) -> list[Batch]:
        """A validation set drawn once per run from its own seed (never seen in training)."""
        gen = torch.Generator(device=self.device).manual_seed(int(seed) + 987_654_321)
        out, left = [], size
        while left > 0:
            out.append(self.batch(min(batch_size, left), gen))
            left -= batch_size
        return out
