"""Quality without downloads: feature-FID/KID on the shipped feature net, teacher distance, x0-change.

Torch-free (numpy + onnxruntime); the bench and the runtime import it.

* `FeatureNet` runs ``export/featurenet/featurenet.onnx`` (trained by
  ``python -m abcd_edge.demo.featurenet``) on uint8 NHWC images -> float64 [N, D].
* `frechet_distance`, `feature_fid`, `feature_kid`: FID/KID in that feature space.
  The numbers are *feature-FID*, comparable only with others from the same
  feature net (its ONNX sha256 is recorded next to cached reference statistics),
  never with Inception FID.
* `teacher_distance`: per-image MSE and PSNR of an n-step x0 against a many-step
  teacher from the same noise, in model space [-1, 1] (PSNR on range 2).
* `x0_change`: per-image mean squared change between consecutive x0 estimates.
* `ReferenceStats`: mean/cov/features of the generator's data for (seed, n),
  cached to ``export/featurenet/reference_<seed>_<n>.npz``.
* `FeatureNet.predict` and `prompt_accuracy`: for nets exported with heads (``kinds``, ``colours``,
  ``count`` outputs, e.g. ``export/featurenet128``), the share of images whose predicted kinds set,
  colours set and count all equal what their prompt names, per attribute, with a 95 % bootstrap CI.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.core.images import fit_images  # noqa: F401  (re-exported: what a feature net sees)
from abcd_edge.io import atomic_path
from abcd_edge.core.images import to_uint8
from abcd_edge.paths import FEATURENET_DIR

ONNX_FILE = "featurenet.onnx"
CONFIG_FILE = "config.json"
TRAIN_HINT = "python -m abcd_edge.demo.featurenet --out export/featurenet"


# --------------------------------------------------------------------------- feature net

class FeatureNet:
    """The shipped feature network on ONNX Runtime (CPU by default, one thread)."""

    def __init__(self, path: str | Path = FEATURENET_DIR, threads: int = 1, providers=None):
        import onnxruntime as ort

        path = Path(path)
        onnx_path = path / ONNX_FILE if path.is_dir() or path.suffix != ".onnx" else path
        folder = onnx_path.parent
        if not onnx_path.is_file():
            raise UserError(f"feature net not found: {onnx_path} (train and export it with: {TRAIN_HINT})")
        data = onnx_path.read_bytes()
        self.path = onnx_path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.config: dict = {}
        cfg_path = folder / CONFIG_FILE
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text())
            except (ValueError, OSError) as e:
                raise UserError(f"feature net config {cfg_path} is unreadable ({e}); re-export with: {TRAIN_HINT}")
            want = self.config.get("files", {}).get(ONNX_FILE)
            if want is not None and want != self.sha256:
                raise UserError(f"feature net {onnx_path} does not match {cfg_path} (sha256 {self.sha256[:12]}... "
                                f"!= {str(want)[:12]}...): the file is corrupt or from another export; "
                                f"re-export with: {TRAIN_HINT}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
            raise UserError(f"feature net {onnx_path} cannot be loaded by ONNX Runtime ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); re-export with: {TRAIN_HINT}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise UserError(f"feature net {onnx_path} has an unexpected input {[(i.name, i.type, i.shape) for i in inputs]}"
                            f" (expected one uint8 [N, 3, H, W] tensor)")
        self.input_name = inputs[0].name
        self.output_name = "features" if any(o.name == "features" for o in outputs) else outputs[0].name
        _, c, h, w = inputs[0].shape
        self.channels, self.height, self.width = c, h, w
        out_shape = next(o.shape for o in outputs if o.name == self.output_name)
        self.dim = out_shape[1] if isinstance(out_shape[1], int) else int(self.config.get("feature_dim", 0))

    def _checked(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images [N, H, W, 3] (or one [H, W, 3]) at the net's input size, else a one-line UserError."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise UserError(f"feature net takes uint8 images [N, H, W, 3], got dtype {images.dtype} "
                            "(convert model-space x with abcd_edge.core.images.to_uint8, or use features_model_space)")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[3] != 3:
            raise UserError(f"feature net takes images [N, H, W, 3], got shape {images.shape}")
        if isinstance(self.height, int) and (images.shape[1], images.shape[2]) != (self.height, self.width):
            raise UserError(f"feature net was trained on {self.height}x{self.width} images, "
                            f"got {images.shape[1]}x{images.shape[2]}")
        return images

    def features(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """uint8 RGB images [N, H, W, 3] (0..255) -> float64 features [N, D]."""
        images = self._checked(images)
        parts = [np.empty((0, self.dim), np.float64)]
        for i in range(0, len(images), max(1, int(batch))):
            x = np.ascontiguousarray(images[i:i + batch].transpose(0, 3, 1, 2))
            parts.append(self.session.run([self.output_name], {self.input_name: x})[0].astype(np.float64))
        out = np.concatenate(parts)
        return out

    def features_model_space(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """float NCHW in [-1, 1] (the sampler's x0) -> features, quantised to uint8 as an image would be."""
        return self.features(to_uint8(np.asarray(x)), batch=batch)

    @property
    def has_heads(self) -> bool:
        """Whether the ONNX graph also outputs the heads' predictions (``kinds``, ``colours``, ``count``)."""
        names = {o.name for o in self.session.get_outputs()}
        return all(name in names for name in HEAD_OUTPUTS)

    def predict(self, images: np.ndarray, batch: int = 256) -> "HeadPredictions":
        """uint8 RGB images [N, H, W, 3] -> the heads' probabilities (kinds and colours: sigmoid; count:
        softmax over ``count_labels``), float64. Nets exported without heads (the 32x32 ``export/featurenet``
        and ``export/evalnet``) are refused with a UserError."""
        if not self.has_heads:
            outputs = ", ".join(o.name for o in self.session.get_outputs())
            raise UserError(f"feature net {self.path} has no prediction heads (outputs: {outputs}); "
                            f"prompt accuracy needs one exported with {', '.join(HEAD_OUTPUTS)} outputs, "
                            f"e.g. export/featurenet128 (python -m abcd_edge.demo.featurenet --resolution 128)")
        images = self._checked(images)
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        parts: dict[str, list[np.ndarray]] = {name: [np.empty((0, shapes[name][1]), np.float64)]
                                              for name in HEAD_OUTPUTS}
        for i in range(0, len(images), max(1, int(batch))):
            x = np.ascontiguousarray(images[i:i + batch].transpose(0, 3, 1, 2))
            for name, out in zip(HEAD_OUTPUTS, self.session.run(list(HEAD_OUTPUTS), {self.input_name: x})):
                parts[name].append(out.astype(np.float64))
        kinds, colours, count = (np.concatenate(parts[name]) for name in HEAD_OUTPUTS)
        return HeadPredictions(kinds, colours, count, self.count_labels)

    @property
    def labels(self) -> dict:
        """The heads' label names from config.json (``kinds``, ``colours``, ``count``); {} without a config."""
        return dict(self.config.get("labels", {}))

    @property
    def count_labels(self) -> tuple[int, ...]:
        """The shape count each ``count`` probability stands for (config.json; 1..C without one)."""
        n = next((o.shape[1] for o in self.session.get_outputs() if o.name == "count"), 3)
        return tuple(int(c) for c in self.labels.get("count", range(1, int(n) + 1)))


HEAD_OUTPUTS = ("kinds", "colours", "count")


class HeadPredictions(NamedTuple):
    """A feature net's head outputs for N images: probabilities, and the decisions prompt accuracy makes."""

    kinds: np.ndarray      # [N, K] sigmoid probabilities
    colours: np.ndarray    # [N, C] sigmoid probabilities
    count: np.ndarray      # [N, S] softmax over count_labels
    count_labels: tuple[int, ...] = (1, 2, 3)

    def kinds_present(self) -> np.ndarray:
        """[N, K] bool: probability > 0.5 (the threshold the nets were trained and evaluated with)."""
        return np.asarray(self.kinds) > 0.5

    def colours_present(self) -> np.ndarray:
        """[N, C] bool: probability > 0.5."""
        return np.asarray(self.colours) > 0.5

    def predicted_count(self) -> np.ndarray:
        """[N] int: the count with the highest probability."""
        return np.asarray(self.count_labels, np.int64)[np.asarray(self.count).argmax(axis=1)]


# --------------------------------------------------------------------------- FID / KID

def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    a = 0.5 * (a + a.T)
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as tr((R S2 R)^(1/2)) with R = S1^(1/2): both
    are symmetric PSD eigen-problems (no complex sqrtm, no eps jitter), and
    R S2 R has the same eigenvalues as S1 S2.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    r = _sqrtm_psd(s1)
    m = r @ (0.5 * (s2 + s2.T)) @ r
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def _check_feats(a: np.ndarray, name: str, min_n: int = 2) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or len(a) < min_n:
        raise ValueError(f"{name}: need features [N >= {min_n}, D], got shape {a.shape}")
    return a


def mean_cov(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = _check_feats(feats, "feats")
    return feats.mean(0), np.cov(feats, rowvar=False)


def feature_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (unbiased covariances)."""
    a, b = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance(*mean_cov(a), *mean_cov(b))


class KID(NamedTuple):
    mean: float
    std: float


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.sum() / (m * n))


def feature_kid(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                seed: int = 0) -> KID:
    """Kernel Inception Distance in feature space: mean and std of the unbiased polynomial-kernel
    MMD^2 over ``subsets`` random subsets of ``min(subset_size, N_a, N_b)`` from each set."""
    a, b = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(int(subset_size), len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = np.array([_poly_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                     for _ in range(max(1, int(subsets)))])
    return KID(float(vals.mean()), float(vals.std()))


# --------------------------------------------------------------------------- teacher distance, x0 change

class TeacherDistance(NamedTuple):
    mse: np.ndarray   # [N]
    psnr: np.ndarray  # [N] dB, range 2 (model space [-1, 1]); inf where identical


def teacher_distance(x: np.ndarray, teacher: np.ndarray) -> TeacherDistance:
    """Per-image MSE and PSNR (peak-to-peak 2) of x against the teacher, both [N, ...] in [-1, 1]."""
    x, t = np.asarray(x, np.float64), np.asarray(teacher, np.float64)
    if x.shape != t.shape or x.ndim < 2:
        raise ValueError(f"x {x.shape} and teacher {t.shape} must have the same [N, ...] shape")
    mse = ((x - t) ** 2).reshape(len(x), -1).mean(1)
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(4.0 / mse)
    return TeacherDistance(mse, psnr)


def x0_change(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Per-image mean squared change between two x0 estimates [N, ...] -> [N]."""
    p, c = np.asarray(prev, np.float64), np.asarray(cur, np.float64)
    if p.shape != c.shape or p.ndim < 2:
        raise ValueError(f"prev {p.shape} and cur {c.shape} must have the same [N, ...] shape")
    return ((c - p) ** 2).reshape(len(c), -1).mean(1)


# --------------------------------------------------------------------------- reference statistics

@dataclass
class ReferenceStats:
    """Feature statistics of the generator's data (seed, indices 0..n-1), cached as npz."""

    seed: int
    n: int
    resolution: int
    mu: np.ndarray        # [D] float64
    sigma: np.ndarray     # [D, D] float64
    features: np.ndarray  # [n, D] float32 (for KID)
    featurenet_sha256: str
    _root: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)  # sigma^1/2, once

    @staticmethod
    def cache_path(seed: int, n: int, cache_dir: str | Path = FEATURENET_DIR, resolution: int | None = None) -> Path:
        """``reference_<seed>_<n>.npz``; images of another size than the net's input (fitted to it,
        ``fit_images``) get ``_r<resolution>`` in the name."""
        tag = f"_r{resolution}" if resolution is not None else ""
        return Path(cache_dir) / f"reference_{seed}_{n}{tag}.npz"

    @classmethod
    def load_or_compute(cls, seed: int, n: int, net: FeatureNet | None = None,
                        cache_dir: str | Path | None = None, resolution: int = 32, batch: int = 256,
                        images: Callable[[int, int, int], np.ndarray] | None = None) -> "ReferenceStats":
        """Load ``reference_<seed>_<n>.npz`` if it matches this feature net, else compute and cache it.

        Computing needs the reference images: ``images(seed, n, resolution)`` -> uint8 NHWC (the demo's
        procedural generator, ``abcd_edge.demo.data.make_images``), fitted to the net's input size. The library never imports the demo,
        so without ``images`` a missing cache is refused with the command that makes it."""
        net = net or FeatureNet()
        cache_dir = Path(cache_dir) if cache_dir is not None else FEATURENET_DIR
        path = cls.cache_path(seed, n, cache_dir, None if resolution == net.height else resolution)
        cached = cls._load(path, seed, n, resolution, net.sha256)
        if cached is not None:
            return cached
        if images is None:
            raise UserError(f"reference statistics {str(path)!r} are missing or were made with another feature net; "
                            f"make them with `python -m abcd_edge.demo.reference --seed {seed} --n {n} "
                            f"--resolution {resolution} --featurenet {cache_dir}`")
        feats = net.features(fit_images(images(seed, n, resolution), net.height, net.width), batch=batch)
        mu, sigma = mean_cov(feats)
        stats = cls(seed, n, resolution, mu, sigma, feats.astype(np.float32), net.sha256)
        stats.save(path)
        return stats

    @classmethod
    def _load(cls, path: Path, seed: int, n: int, resolution: int, sha: str) -> "ReferenceStats | None":
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if (int(z["seed"]) != seed or int(z["n"]) != n or int(z["resolution"]) != resolution
                        or str(z["featurenet_sha256"]) != sha):
                    return None
                mu, sigma, feats = z["mu"], z["sigma"], z["features"]
        except Exception:  # corrupt or foreign file: recompute
            return None
        d = mu.shape[0] if mu.ndim == 1 else -1
        if d < 1 or sigma.shape != (d, d) or feats.shape != (n, d):
            return None
        return cls(seed, n, resolution, mu.astype(np.float64), sigma.astype(np.float64), feats, sha)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                np.savez(f, seed=self.seed, n=self.n, resolution=self.resolution, mu=self.mu, sigma=self.sigma,
                         features=self.features, featurenet_sha256=np.array(self.featurenet_sha256))

    def fid(self, feats: np.ndarray) -> float:
        """feature-FID of a feature set [M, D] against these statistics."""
        return frechet_distance(*mean_cov(feats), self.mu, self.sigma)

    def fid_to_reference(self, feats: np.ndarray) -> float:
        """:meth:`fid` (= frechet_distance) for many feature sets against these fixed statistics, fast.

        With R = sigma_ref^1/2 computed once, tr((R S R)^1/2) for the unbiased covariance S of the
        features is the sum of the singular values of A = (X - mu) R / sqrt(N - 1), since R S R = A^T A:
        one small SVD per call and no covariance matrix (the bench's bootstrap calls this hundreds of times)."""
        if self._root is None:
            self._root = _sqrtm_psd(np.asarray(self.sigma, np.float64))
        x = _check_feats(feats, "feats")
        mu = x.mean(0)
        a = (x - mu) @ self._root / math.sqrt(len(x) - 1)
        tr_covmean = float(np.linalg.svd(a, compute_uv=False).sum())
        tr_s = float(((x - mu) ** 2).sum() / (len(x) - 1))
        d = mu - self.mu
        return max(float(d @ d + tr_s + float(np.trace(self.sigma)) - 2.0 * tr_covmean), 0.0)


# --------------------------------------------------------------------------- prompt accuracy

@dataclass(frozen=True)
class PromptAccuracy:
    """How often generated images show what their prompts name, judged by a feature net's heads.

    ``exact``: share of images whose predicted kinds set, colours set and count all equal the prompt's,
    with a 95 % bootstrap CI (``exact_ci``); ``kinds`` / ``colours`` / ``count``: the share right in that
    attribute alone (a set is right only when every kind / colour is). ``per_image``: the exact matches."""

    n: int
    exact: float
    exact_ci: tuple[float, float]
    kinds: float
    colours: float
    count: float
    per_image: np.ndarray = field(repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"n": self.n, "exact": round(self.exact, 4), "exact_ci95": [round(v, 4) for v in self.exact_ci],
                "kinds": round(self.kinds, 4), "colours": round(self.colours, 4), "count": round(self.count, 4)}


WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


@dataclass(frozen=True)
class PromptTarget:
    """What a prompt names: kinds and colours present (multi-hot, in a net's label order) and the count."""

    kinds: np.ndarray
    colours: np.ndarray
    count: int


def parse_prompt(text: str, kinds: Sequence[str], colours: Sequence[str]) -> PromptTarget:
    """A caption of the shapes data ("two red circles and a blue triangle": groups "<number> <colour> <kind>[s]"
    joined by ", " and " and ") -> what it names, in the order of ``kinds`` / ``colours`` (a feature net's
    label names); ValueError for text of another form."""
    import re

    group = re.compile(r"(" + "|".join(WORD_NUMBERS) + r") (" + "|".join(map(re.escape, colours)) + r") ("
                       + "|".join(map(re.escape, kinds)) + r")s?$")
    k = np.zeros(len(kinds), np.float32)
    c = np.zeros(len(colours), np.float32)
    count = 0
    for part in re.split(r", | and ", text.strip().lower()):
        m = group.match(part.strip())
        if m is None:
            raise ValueError(f"{part!r} of {text!r} is not '<number> <colour> <kind>'")
        count += WORD_NUMBERS[m.group(1)]
        c[list(colours).index(m.group(2))] = 1.0
        k[list(kinds).index(m.group(3))] = 1.0
    return PromptTarget(k, c, count)


def _targets(prompts: Sequence, labels: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts (caption strings, read with the net's label names ``labels``; or targets with ``kinds``,
    ``colours`` multi-hot and ``count``) -> kinds [N, K] bool, colours [N, C] bool, count [N] int."""
    targets = []
    for p in prompts:
        if isinstance(p, str):
            if not labels.get("kinds") or not labels.get("colours"):
                raise UserError("prompt accuracy of text prompts needs the feature net's label names (config.json "
                                "'labels': kinds, colours)")
            try:
                p = parse_prompt(p, labels["kinds"], labels["colours"])
            except ValueError as e:
                raise UserError(f"prompt accuracy: {e}") from None
        targets.append(p)
    kinds = np.array([np.asarray(t.kinds, np.float64) > 0.5 for t in targets], bool).reshape(len(targets), -1)
    colours = np.array([np.asarray(t.colours, np.float64) > 0.5 for t in targets], bool).reshape(len(targets), -1)
    count = np.array([int(t.count) for t in targets], np.int64)
    return kinds, colours, count


def score_prompts(pred: HeadPredictions, prompts: Sequence, labels: dict | None = None,
                  resamples: int = 2000, seed: int = 0) -> PromptAccuracy:
    """:func:`prompt_accuracy` on predictions already made (``FeatureNet.predict`` or hand-made ones)."""
    n = len(prompts)
    if n == 0:
        raise UserError("prompt accuracy needs at least one image and prompt")
    if not len(pred.kinds) == len(pred.colours) == len(pred.count) == n:
        raise UserError(f"prompt accuracy: {len(pred.kinds)} images (predictions) for {n} prompts")
    t_kinds, t_colours, t_count = _targets(prompts, labels or {})
    p_kinds, p_colours, p_count = pred.kinds_present(), pred.colours_present(), pred.predicted_count()
    if p_kinds.shape != t_kinds.shape or p_colours.shape != t_colours.shape:
        raise UserError(f"prompt accuracy: the net predicts {p_kinds.shape[1]} kinds and {p_colours.shape[1]} "
                        f"colours, the prompts name {t_kinds.shape[1]} and {t_colours.shape[1]}")
    kinds_ok = (p_kinds == t_kinds).all(axis=1)
    colours_ok = (p_colours == t_colours).all(axis=1)
    count_ok = p_count == t_count
    exact = kinds_ok & colours_ok & count_ok
    # percentile bootstrap over images: the mean of n draws with replacement from n Bernoulli outcomes is
    # Binomial(n, share) / n, drawn directly (the same distribution as resampling indices, without them)
    share = float(exact.mean())
    boot = np.random.default_rng(seed).binomial(n, share, size=max(1, int(resamples))) / n
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return PromptAccuracy(n=n, exact=share, exact_ci=(float(lo), float(hi)), kinds=float(kinds_ok.mean()),
                          colours=float(colours_ok.mean()), count=float(count_ok.mean()), per_image=exact)


def prompt_accuracy(net: FeatureNet, images: np.ndarray, prompts: Sequence, batch: int = 256,
                    resamples: int = 2000, seed: int = 0) -> PromptAccuracy:
    """The share of ``images`` (uint8 NHWC, the net's input size) whose predicted kinds set, colours set
    and count all equal what their prompt names, per attribute, and a 95 % bootstrap CI of that share.

    ``prompts``: one per image, a caption string (read by :func:`parse_prompt` with the net's label names)
    or a target with ``kinds``/``colours`` multi-hot in the net's label order and ``count``. Decisions:
    probability > 0.5 for kinds and colours, the most probable count. Nets without heads: UserError."""
    pred = net.predict(images, batch=batch)   # first: a net without heads is refused before anything else
    return score_prompts(pred, prompts, getattr(net, "labels", None), resamples=resamples, seed=seed)
