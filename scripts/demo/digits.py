"""Shared helpers of the digits demo (scripts/demo/train_digits.py, scripts/demo/score_digits.py).

The data is scikit-learn's `load_digits`: 1,797 handwritten digits of 8×8 pixels with values 0..16,
shipped inside the package (nothing is downloaded). The demo model works on 16×16 one-channel images:
each digit is upscaled to 12×12 with bilinear interpolation (half-pixel centres, as torch's
`interpolate(mode="bilinear", align_corners=False)` and PIL; chosen over nearest because 8→12 is not an
integer factor, and nearest would double every other row and column) and placed in the middle of a
black 16×16 frame (a 2-pixel border), the way MNIST centres its digits in a margin.

The interpolation is written out in numpy, so the framing depends on no library's resampling code.
Pixel values are in [0, 1] here (0 black, 1 white); training scales them to [-1, 1].
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

SIZE = 16
DIGIT = 12
BORDER = (SIZE - DIGIT) // 2


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """The (dst, src) matrix of 1-D linear interpolation with half-pixel centres, edges clamped."""
    m = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        x = (i + 0.5) * src / dst - 0.5
        x = min(max(x, 0.0), src - 1.0)
        lo = int(np.floor(x))
        hi = min(lo + 1, src - 1)
        w = x - lo
        m[i, lo] += 1.0 - w
        m[i, hi] += w
    return m


def frame(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) values 0..16 → (N, 16, 16) float64 in [0, 1]: 12×12 bilinear, 2-pixel black border."""
    m = _bilinear_matrix(images8.shape[-1], DIGIT)
    up = np.einsum("ij,njk,lk->nil", m, images8.astype(np.float64) / 16.0, m)
    out = np.zeros((images8.shape[0], SIZE, SIZE), dtype=np.float64)
    out[:, BORDER : BORDER + DIGIT, BORDER : BORDER + DIGIT] = np.clip(up, 0.0, 1.0)
    return out


def real_digits():
    """All 1,797 digits framed to 16×16 in [0, 1], and their labels."""
    data = load_digits()
    return frame(data.images), data.target.astype(np.int64)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats → the bytes of an 8-bit PNG, rounded as diffusers' numpy_to_pil and the service do."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def features(images_u8: np.ndarray) -> np.ndarray:
    """(N, 16, 16) uint8 → (N, 256) float64 in [0, 1], the classifier's input."""
    return images_u8.reshape(len(images_u8), -1).astype(np.float64) / 255.0


def classifier():
    """Logistic regression on all 1,797 framed digits, quantised to 8 bits as the generated PNGs are.

    Plain defaults (L2, C=1, lbfgs) with enough iterations to converge: the classifier is a fixed ruler
    for the generated samples, not tuned to flatter them. Deterministic (lbfgs, no random state used)."""
    images, labels = real_digits()
    x = features(to_uint8(images))
    clf = LogisticRegression(C=1.0, max_iter=5000)
    clf.fit(x, labels)
    return clf, x, labels
