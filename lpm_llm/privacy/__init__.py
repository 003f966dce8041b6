"""Privacy-preserving calibration: data holders keep their series; the coordinator learns sums.

- :mod:`~lpm_llm.privacy.secure_sum`: fixed point modulo 2^64, pairwise masks from X25519 + HKDF +
  ChaCha20 (``cryptography``), the secure sum over a process group, its transcript.
- :mod:`~lpm_llm.privacy.dp`: clipping and distributed Gaussian noise, the privacy accountant (opacus).
- :mod:`~lpm_llm.privacy.calibrate`: the calibration loop over holders (``lpm-llm calibrate --nproc H``).
"""

from lpm_llm.privacy.settings import PrivacySettings

__all__ = ["PrivacySettings"]
