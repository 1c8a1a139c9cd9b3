"""Scores generated digits: a folder of 16×16 8-bit grayscale PNGs (what `ddpm-worker generate` writes
under samples/ for the one-channel demo model) against scikit-learn's bundled digits.

    python scripts/demo/score_digits.py OUT/samples
    python scripts/demo/score_digits.py --labelled OUT/samples

With --labelled the folder is a labelled job's files layout, one folder per class named by its digit
(samples/<digit>/<index>.png, what the class-conditional demo model's jobs write), and the JSON adds:
  agreement           share of samples whose most likely class is the digit their folder names
  agreement_by_class  the same per digit
  label_counts        samples per folder

Prints one JSON object:
  count               PNGs scored
  mean_top_prob       mean over samples of the classifier's highest class probability: near 1 when each
                      sample looks clearly like one digit, lower for ambiguous ones (real digits: 0.93);
                      on its own it does not tell digits from noise (see in_distribution)
  classes_covered     how many of the 10 digits are some sample's most likely class
  class_counts        samples per most likely class, "0".."9"
  in_distribution     share of samples that lie near the real digits in pixel space: the residual after
                      projecting onto the real digits' first 20 principal components is no larger than
                      the 99th percentile of the real digits' own residuals. The classifier cannot tell
                      noise from digits (a linear model is most confident far from its data: saturated
                      noise gets a mean top-class probability of ~0.8); this can (noise scores 0)
  frechet_distance    Fréchet distance between Gaussians fitted to the generated and to all 1,797 real
                      digits in the classifier's decision_function space (10 dimensions): a regression
                      signal for how the whole set drifts, lower is better
  reference           the same numbers for real digits, for scale: the classifier's mean top-class
                      probability on the digits it was fitted on, and the Fréchet distance of random
                      subsets of real digits of the same count (the floor that sampling noise alone gives)

The classifier (scripts/demo/digits.py) is logistic regression fitted on all real digits in the demo's
16×16 framing. Deterministic: the same PNGs give the same JSON.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402


def load_pngs(folder: Path) -> np.ndarray:
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNGs in {folder}")
    images = []
    for path in paths:
        with Image.open(path) as im:
            if im.mode != "L" or im.size != (digits.SIZE, digits.SIZE):
                raise SystemExit(
                    f"{path}: {im.mode} {im.size[0]}×{im.size[1]}, expected 8-bit grayscale (L) "
                    f"{digits.SIZE}×{digits.SIZE}"
                )
            images.append(np.asarray(im, dtype=np.uint8))
    return np.stack(images)


def gaussian(x: np.ndarray):
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet(a, b) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), as FID computes it (imaginary round-off dropped)."""
    (mu1, s1), (mu2, s2) = a, b
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # A singular product (few samples, collapsed classes): FID's usual regularisation.
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def score(images_u8: np.ndarray) -> dict:
    clf, real_x, _ = digits.classifier()
    x = digits.features(images_u8)
    probs = clf.predict_proba(x)
    top = probs.argmax(axis=1)
    counts = np.bincount(clf.classes_[top], minlength=10)

    real_d = clf.decision_function(real_x)
    real_g = gaussian(real_d)
    gen_d = clf.decision_function(x)
    fd = frechet(gaussian(gen_d), real_g)

    pca = PCA(n_components=20, svd_solver="full").fit(real_x)

    def residual(features):
        return np.linalg.norm(features - pca.inverse_transform(pca.transform(features)), axis=1)

    limit = np.percentile(residual(real_x), 99)

    # Real subsets of the same size: what the distance is for samples that are real digits.
    rng = np.random.default_rng(0)
    floor = [
        frechet(gaussian(real_d[rng.choice(len(real_d), size=len(x), replace=False)]), real_g)
        for _ in range(20)
    ]
    return {
        "count": int(len(x)),
        "mean_top_prob": float(probs.max(axis=1).mean()),
        "classes_covered": int((counts > 0).sum()),
        "in_distribution": float((residual(x) <= limit).mean()),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "frechet_distance": fd,
        "reference": {
            "real_mean_top_prob": float(clf.predict_proba(real_x).max(axis=1).mean()),
            "real_subset_frechet_median": float(np.median(floor)),
            "real_subset_frechet_max": float(np.max(floor)),
        },
    }


def score_labelled(folder: Path) -> dict:
    """`score` of every sample under the class folders of `folder`, with how often the classifier's most
    likely digit is the folder's."""
    clf, _, _ = digits.classifier()
    images, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = load_pngs(sub)
        images.append(found)
        labels += [int(sub.name)] * len(found)
    images, labels = np.concatenate(images), np.array(labels)
    predicted = clf.classes_[clf.predict_proba(digits.features(images)).argmax(axis=1)]
    result = score(images)
    result["agreement"] = float((predicted == labels).mean())
    result["agreement_by_class"] = {
        str(c): float((predicted[labels == c] == c).mean()) for c in sorted(set(labels.tolist()))
    }
    result["label_counts"] = {str(c): int((labels == c).sum()) for c in sorted(set(labels.tolist()))}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder of 16×16 grayscale PNGs (e.g. OUT/samples)")
    parser.add_argument("--labelled", action="store_true", help="the folder holds one folder per digit")
    args = parser.parse_args()
    result = score_labelled(args.folder) if args.labelled else score(load_pngs(args.folder))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
