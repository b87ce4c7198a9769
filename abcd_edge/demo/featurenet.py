"""Train and export the shipped feature network (feature-FID/KID without downloads).

A small CNN (4 conv blocks, GroupNorm/ReLU, global average pool -> a 128-d
feature, then heads) is trained on the procedural data set to recognise which
shape kinds and colours are present (BCE) and how many shapes there are (CE).
Its pooled feature is the space in which `abcd_edge.quality` measures FID/KID.

    python -m abcd_edge.demo.featurenet --out export/featurenet

writes, atomically as one folder:

    featurenet.safetensors  torch weights (no pickle)
    featurenet.onnx         input ``images`` uint8 [N, 3, 32, 32] (NCHW, 0..255),
                            output ``features`` float32 [N, 128], dynamic N;
                            the normalisation x / 127.5 - 1 is inside the graph
    config.json             architecture, normalisation, data, training, held-out
                            accuracies, ORT-vs-torch parity, file hashes

Other resolutions (``--resolution 128``, a multiple of 32): a patchify stem (conv k x k stride k,
GroupNorm, ReLU; k = resolution / 32) brings the image to 32x32 first, then the same blocks, so the
CPU cost stays near the 32x32 net's. Such nets' ONNX graph also outputs the heads' predictions
(``--onnx-heads`` asks for them at 32 too; the default 32x32 export is unchanged, features only):

    kinds    float32 [N, 5]  sigmoid probabilities (label order in config.json)
    colours  float32 [N, 8]  sigmoid probabilities
    count    float32 [N, 3]  softmax over counts 1..3

which `abcd_edge.quality.FeatureNet.predict` reads (prompt accuracy).

torch is needed here only (training/export); the runtime side reads the ONNX
file through `abcd_edge.quality.FeatureNet`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

if __name__ == "__main__":   # a runtime-only install: one line naming the extra, not a ModuleNotFoundError
    from abcd_edge.extras import require_or_exit

    require_or_exit("python -m abcd_edge.demo.featurenet", "train", "torch", "onnx")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from abcd_edge.demo.data import COLOUR_NAMES, KINDS, MAX_SHAPES, make_example  # noqa: E402
from abcd_edge.errors import UserError  # noqa: E402
from abcd_edge.io import atomic_dir  # noqa: E402

FORMAT = "abcd-edge-featurenet/1"
DATA_SEED = 777                 # distinct from the diffusion model's 1234
HELDOUT_START = 10_000_000      # held-out indices of the same seed, disjoint from training
RESOLUTION = 32
WIDTHS = (32, 64, 96, 128)
DEPTHS = (1, 1, 1, 1)           # conv-GN-ReLU layers per block
GROUPS = 8
ONNX_OPSET = 18
PARITY_TOL = 1e-4
WEIGHTS_FILE = "featurenet.safetensors"
ONNX_FILE = "featurenet.onnx"
CONFIG_FILE = "config.json"


class FeatureCNN(nn.Module):
    """conv3x3-GN-ReLU x4 (avg-pool /2 between blocks), global average pool -> feature; linear heads.

    ``stem`` > 1 puts a patchify stem first (conv stem x stem, stride stem, to ``widths[0]`` channels,
    GroupNorm, ReLU): a 128x128 input with stem 4 reaches the blocks at 32x32. stem 1 (the default) adds
    no module at all, so 32x32 nets keep their parameters, state-dict keys and initialisation."""

    def __init__(self, widths=WIDTHS, groups: int = GROUPS, n_kinds: int = len(KINDS),
                 n_colours: int = len(COLOUR_NAMES), n_counts: int = MAX_SHAPES, depths=DEPTHS, stem: int = 1):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} differ in length")
        if stem < 1:
            raise ValueError(f"stem factor {stem} < 1")
        self.stem_factor = int(stem)
        c_in = 3
        if stem > 1:
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], stem, stride=stem), nn.GroupNorm(groups, widths[0]),
                                      nn.ReLU())
            c_in = widths[0]
        layers: list[nn.Module] = []
        for i, (c, d) in enumerate(zip(widths, depths)):
            if i > 0:
                layers.append(nn.AvgPool2d(2))
            for _ in range(d):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(groups, c), nn.ReLU()]
                c_in = c
        self.body = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.kinds = nn.Linear(c_in, n_kinds)
        self.colours = nn.Linear(c_in, n_colours)
        self.count = nn.Linear(c_in, n_counts)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x float [N, 3, H, W] in [-1, 1] -> [N, D] (global average of the last block, >= 0)."""
        if self.stem_factor > 1:
            x = self.stem(x)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.kinds(f), self.colours(f), self.count(f)


class _OnnxFeatures(nn.Module):
    """The exported graph: uint8 NCHW 0..255 -> normalise -> features."""

    def __init__(self, net: FeatureCNN):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.to(torch.float32) / 127.5 - 1.0)


class _OnnxFeaturesAndHeads(nn.Module):
    """The exported graph of nets with heads: uint8 NCHW -> features, kinds, colours (sigmoid), count (softmax)."""

    def __init__(self, net: FeatureCNN):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor):
        f = self.net.features(images.to(torch.float32) / 127.5 - 1.0)
        return (f, torch.sigmoid(self.net.kinds(f)), torch.sigmoid(self.net.colours(f)),
                torch.softmax(self.net.count(f), dim=1))


HEAD_OUTPUTS = ("kinds", "colours", "count")


def stem_factor(resolution: int) -> int:
    """Patchify factor that brings ``resolution`` to the blocks' 32x32 (1 at 32: no stem)."""
    if resolution < RESOLUTION or resolution % RESOLUTION:
        raise UserError(f"--resolution {resolution}: accepted a multiple of {RESOLUTION} (32, 64, 128, ...)")
    return resolution // RESOLUTION


def labelled(seed: int, start: int, n: int, resolution: int = RESOLUTION):
    """Images uint8 [n,H,W,3], kinds [n,K], colours [n,C], count index [n] (0..MAX_SHAPES-1)."""
    ex = [make_example(seed, start + i, resolution) for i in range(n)]
    return (np.stack([e[0] for e in ex]), np.stack([e[1].kinds for e in ex]),
            np.stack([e[1].colours for e in ex]), np.array([e[1].count - 1 for e in ex], np.int64))


def _to_input(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


@torch.no_grad()
def evaluate(net: FeatureCNN, data, batch: int = 500, exact_match: bool = False) -> dict:
    """Held-out accuracies: per-label (threshold 0.5), exact label sets, count; with ``exact_match`` also
    the share of images whose kinds set, colours set and count are all right (what prompt accuracy asks)."""
    images, kinds, colours, counts = data
    net.eval()
    pk, pc, pn = [], [], []
    for i in range(0, len(images), batch):
        k, c, n = net(_to_input(images[i:i + batch]))
        pk.append((k > 0).numpy()); pc.append((c > 0).numpy()); pn.append(n.argmax(1).numpy())
    pk, pc, pn = np.concatenate(pk), np.concatenate(pc), np.concatenate(pn)
    kinds_ok, colours_ok = pk == (kinds > 0.5), pc == (colours > 0.5)
    out = {
        "images": int(len(images)),
        "per_label_accuracy": round(float(np.concatenate([kinds_ok, colours_ok], 1).mean()), 4),
        "kinds_per_label_accuracy": round(float(kinds_ok.mean()), 4),
        "colours_per_label_accuracy": round(float(colours_ok.mean()), 4),
        "kinds_exact_set_accuracy": round(float(kinds_ok.all(1).mean()), 4),
        "colours_exact_set_accuracy": round(float(colours_ok.all(1).mean()), 4),
        "count_accuracy": round(float((pn == counts).mean()), 4),
    }
    if exact_match:
        out["exact_match_accuracy"] = round(float((kinds_ok.all(1) & colours_ok.all(1) & (pn == counts)).mean()), 4)
    return out


def export_onnx(net: FeatureCNN, path: Path, resolution: int = RESOLUTION, heads: bool = False) -> None:
    """uint8 NCHW -> features (and with ``heads`` kinds, colours, count), dynamic batch, one self-contained file."""
    net.eval()
    wrapper = (_OnnxFeaturesAndHeads(net) if heads else _OnnxFeatures(net)).eval()
    example = torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8)
    batch = torch.export.Dim("batch")
    torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                      output_names=["features", *HEAD_OUTPUTS] if heads else ["features"],
                      opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                      dynamic_shapes={"images": {0: batch}})


def parity(net: FeatureCNN, onnx_path: Path, images_nhwc: np.ndarray, heads: bool = False) -> float:
    """Max |ORT - torch| of the features (and with ``heads`` of every output) on the given images."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))
    if heads:
        got = sess.run(["features", *HEAD_OUTPUTS], {"images": x})
        with torch.no_grad():
            want = [t.numpy() for t in _OnnxFeaturesAndHeads(net.eval())(torch.from_numpy(x))]
        return float(max(np.abs(g - w).max() for g, w in zip(got, want)))
    got = sess.run(["features"], {"images": x})[0]
    with torch.no_grad():
        want = _OnnxFeatures(net.eval())(torch.from_numpy(x)).numpy()
    return float(np.abs(got - want).max())


def build_from_config(config: dict) -> FeatureCNN:
    arch = config["architecture"]
    widths = tuple(arch["widths"])
    return FeatureCNN(widths=widths, groups=arch["groups"], depths=tuple(arch.get("depths", (1,) * len(widths))),
                      n_kinds=len(config["labels"]["kinds"]), n_colours=len(config["labels"]["colours"]),
                      n_counts=len(config["labels"]["count"]), stem=int(arch.get("stem", {}).get("factor", 1)))


def load_torch(folder: str | Path) -> FeatureCNN:
    """Rebuild the trained network from config.json + safetensors (no pickle anywhere)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"no feature net at {folder} (need {CONFIG_FILE} and {WEIGHTS_FILE}); "
                        f"train one with: python -m abcd_edge.demo.featurenet --out {folder}")
    config = json.loads(cfg_path.read_text())
    net = build_from_config(config)
    net.load_state_dict(load_file(str(w_path)))
    return net.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(out: Path, n_train: int, n_heldout: int, steps: int, batch: int, lr: float, threads: int,
          seed: int, widths=WIDTHS, depths=DEPTHS, resolution: int = RESOLUTION, onnx_heads: bool = False) -> dict:
    """Train, evaluate, export. ``resolution`` != 32 adds the patchify stem and always exports the heads;
    at 32 they are exported only with ``onnx_heads`` (the committed 32x32 nets have features only)."""
    from safetensors.torch import save_file

    stem = stem_factor(resolution)
    heads = onnx_heads or resolution != RESOLUTION
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_start = time.monotonic()
    print(f"generating {n_train} training + {n_heldout} held-out images at {resolution}x{resolution} "
          f"(seed {DATA_SEED}) ...", flush=True)
    tr = labelled(DATA_SEED, 0, n_train, resolution)
    ho = labelled(DATA_SEED, HELDOUT_START, n_heldout, resolution)
    # uint8 kept, each batch normalised when drawn (the same values as normalising all at once: one
    # elementwise numpy expression), so 128x128 data sets stay at a quarter of the float32 memory
    x_u8 = tr[0]
    k_all, c_all, n_all = torch.from_numpy(tr[1]), torch.from_numpy(tr[2]), torch.from_numpy(tr[3])
    t_data = time.monotonic() - t_start

    net = FeatureCNN(widths=widths, depths=depths, stem=stem)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    warm = max(1, steps // 50)
    losses: list[float] = []
    t0 = time.monotonic()
    net.train()
    for step in range(steps):
        frac = step / max(steps - 1, 1)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + np.cos(np.pi * frac))
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        x = _to_input(x_u8[idx.numpy()])
        # light augmentation: the labels are invariant to horizontal and vertical flips
        fh = torch.rand(batch, generator=gen) < 0.5
        fv = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(fh[:, None, None, None], x.flip(-1), x)
        x = torch.where(fv[:, None, None, None], x.flip(-2), x)
        k, c, n = net(x)
        loss = (F.binary_cross_entropy_with_logits(k, k_all[idx])
                + F.binary_cross_entropy_with_logits(c, c_all[idx])
                + F.cross_entropy(n, n_all[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-250:]):.4f} "
                  f"({time.monotonic() - t0:.0f}s)", flush=True)
    t_train = time.monotonic() - t0
    net.eval()
    acc = evaluate(net, ho, exact_match=heads)
    acc_train = evaluate(net, tuple(a[:n_heldout] for a in tr), exact_match=heads)
    print("held-out:", json.dumps(acc), flush=True)

    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        export_onnx(net, tmp / ONNX_FILE, resolution, heads=heads)
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, size=(8, resolution, resolution, 3), dtype=np.uint8)
        max_diff = parity(net, tmp / ONNX_FILE, np.concatenate([ho[0][:56], noise]), heads=heads)
        print(f"ORT vs torch max |diff| = {max_diff:.2e} (tolerance {PARITY_TOL:g})", flush=True)
        if not max_diff <= PARITY_TOL:
            raise RuntimeError(f"ONNX parity failed: max |diff| {max_diff:.3e} > {PARITY_TOL:g}")
        architecture = {
            "type": "conv3x3-GroupNorm-ReLU blocks, avg-pool /2 between blocks, global average pool",
            "widths": list(widths), "depths": list(depths), "groups": GROUPS,
            "heads": {"kinds": "linear, BCE", "colours": "linear, BCE", "count": "linear, CE over 1..3"},
            "parameters": sum(p.numel() for p in net.parameters()),
        }
        if stem > 1:
            architecture["stem"] = {"type": f"patchify conv {stem}x{stem} stride {stem} -> widths[0], GroupNorm, ReLU",
                                    "factor": stem, "blocks_input": [resolution // stem, resolution // stem]}
        command = (f"python -m abcd_edge.demo.featurenet --out {out} --images {n_train} --heldout {n_heldout} "
                   f"--steps {steps} --batch {batch} --lr {lr} --threads {threads} --seed {seed} "
                   f"--widths {','.join(map(str, widths))} --depths {','.join(map(str, depths))}")
        if resolution != RESOLUTION:
            command += f" --resolution {resolution}"
        if onnx_heads:
            command += " --onnx-heads"
        config = {
            "format": FORMAT,
            "architecture": architecture,
            "feature_dim": net.feature_dim,
            "feature_layer": "global average of the last block (post-ReLU, >= 0), before the heads",
            "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "shape": ["N", 3, resolution, resolution],
                      "range": [0, 255], "channels": "RGB"},
            "normalisation": "x / 127.5 - 1 (the diffusion model's data space), inside the ONNX graph",
            "output": {"name": "features", "dtype": "float32", "shape": ["N", net.feature_dim]},
            "labels": {"kinds": list(KINDS), "colours": list(COLOUR_NAMES), "count": list(range(1, MAX_SHAPES + 1))},
            "data": {"generator": "abcd_edge.demo.data.make_example", "seed": DATA_SEED, "resolution": resolution,
                     "train_indices": [0, n_train], "heldout_indices": [HELDOUT_START, HELDOUT_START + n_heldout]},
            "training": {
                "command": command,
                "steps": steps, "batch": batch, "lr": lr, "optimiser": "AdamW(wd=1e-4), linear warm-up, cosine decay",
                "augmentation": "random horizontal and vertical flips",
                "threads": threads, "seed": seed,
                "data_wall_s": round(t_data, 1), "train_wall_s": round(t_train, 1),
                "final_loss_mean_last_250": round(float(np.mean(losses[-250:])), 4),
                "torch": torch.__version__,
            },
            "heldout": acc,
            "train_subset": acc_train,
            "parity": {"max_abs_diff": max_diff, "tolerance": PARITY_TOL,
                       "images": "56 held-out generator images + 8 uniform-noise images"},
            "onnx": {"opset": ONNX_OPSET, "dynamic_axes": {"images": [0], "features": [0]}},
            "files": {WEIGHTS_FILE: _sha256(tmp / WEIGHTS_FILE), ONNX_FILE: _sha256(tmp / ONNX_FILE)},
        }
        if heads:
            labels = config["labels"]
            config["outputs"] = [
                dict(config["output"], description="global average of the last block"),
                {"name": "kinds", "dtype": "float32", "shape": ["N", len(labels["kinds"])],
                 "description": "sigmoid probability of each kind present (labels.kinds order)"},
                {"name": "colours", "dtype": "float32", "shape": ["N", len(labels["colours"])],
                 "description": "sigmoid probability of each colour present (labels.colours order)"},
                {"name": "count", "dtype": "float32", "shape": ["N", len(labels["count"])],
                 "description": "softmax over the shape counts labels.count"},
            ]
            config["prediction"] = {"kinds": "probability > 0.5", "colours": "probability > 0.5",
                                    "count": "labels.count[argmax]",
                                    "exact_match": "kinds set, colours set and count all right"}
            config["onnx"]["dynamic_axes"].update({name: [0] for name in HEAD_OUTPUTS})
            config["parity"]["outputs"] = ["features", *HEAD_OUTPUTS]
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out} (train {t_train / 60:.1f} min)", flush=True)
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("export/featurenet"))
    ap.add_argument("--images", type=int, default=30000, help="training images (seed 777, indices 0..N-1)")
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--widths", type=_ints, default=WIDTHS, help="channels per block, e.g. 32,64,96,128")
    ap.add_argument("--depths", type=_ints, default=DEPTHS, help="conv layers per block, e.g. 1,1,1,1")
    ap.add_argument("--resolution", type=int, default=RESOLUTION,
                    help="image side, a multiple of 32; above 32 a patchify stem brings it to 32 and the ONNX "
                         "graph also outputs the heads (kinds, colours, count)")
    ap.add_argument("--onnx-heads", action="store_true",
                    help="export the heads' predictions at 32x32 too (always on above 32)")
    a = ap.parse_args()
    try:
        stem_factor(a.resolution)
    except UserError as e:
        ap.error(str(e))
    train(a.out, a.images, a.heldout, a.steps, a.batch, a.lr, a.threads, a.seed, a.widths, a.depths,
          a.resolution, a.onnx_heads)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


if __name__ == "__main__":
    main()
