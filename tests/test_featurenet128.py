"""128x128 feature networks with prediction heads, and prompt accuracy (issue 16).

A tiny 128 net is trained for a few steps and exported (features + kinds/colours/count); its ONNX heads must
agree with torch. Prompt accuracy is checked on hand-made predictions. The committed 32x32 nets must keep
loading and giving the same features, and refuse prompt accuracy (they have no heads)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from abcd_edge.demo.captions import caption, parse_caption
from abcd_edge.demo.data import COLOUR_NAMES, KINDS, make_example, make_images
from abcd_edge.errors import UserError
from abcd_edge.paths import EVALNET_DIR, FEATURENET_DIR
from abcd_edge.quality import FeatureNet, HeadPredictions, prompt_accuracy, score_prompts

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from abcd_edge.demo import featurenet as fn  # noqa: E402  (needs torch)


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    """A tiny 128x128 net (widths 8,16), 3 steps on 48 images, exported: (folder, config)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fn128") / "net"
    cfg = fn.train(out, n_train=48, n_heldout=16, steps=3, batch=8, lr=2e-3, threads=1, seed=0,
                   widths=(8, 16), depths=(1, 1), resolution=128)
    return out, cfg


# --------------------------------------------------------------------------- training and export at 128

def test_tiny128_exports_features_and_heads(tiny128):
    out, cfg = tiny128
    model = onnx.load(str(out / "featurenet.onnx"))
    assert [o.name for o in model.graph.output] == ["features", "kinds", "colours", "count"]
    assert [i.name for i in model.graph.input] == ["images"]
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk == cfg
    assert cfg["input"]["shape"] == ["N", 3, 128, 128] and cfg["data"]["resolution"] == 128
    assert cfg["architecture"]["stem"]["factor"] == 4 and cfg["architecture"]["stem"]["blocks_input"] == [32, 32]
    assert [o["name"] for o in cfg["outputs"]] == ["features", "kinds", "colours", "count"]
    assert [o["shape"] for o in cfg["outputs"]] == [["N", 16], ["N", 5], ["N", 8], ["N", 3]]
    assert cfg["parity"]["outputs"] == ["features", "kinds", "colours", "count"]
    assert cfg["parity"]["max_abs_diff"] <= cfg["parity"]["tolerance"]
    assert "--resolution 128" in cfg["training"]["command"]
    for split in ("heldout", "train_subset"):
        assert set(cfg[split]) >= {"per_label_accuracy", "kinds_per_label_accuracy", "colours_per_label_accuracy",
                                   "kinds_exact_set_accuracy", "colours_exact_set_accuracy", "count_accuracy",
                                   "exact_match_accuracy"}
    net = FeatureNet(out)
    assert net.has_heads and (net.height, net.width) == (128, 128) and net.dim == 16
    assert net.count_labels == (1, 2, 3)


def test_onnx_heads_agree_with_torch(tiny128):
    out, _ = tiny128
    net = FeatureNet(out)
    images = make_images(99, 6, resolution=128)
    pred = net.predict(images, batch=4)
    model = fn.load_torch(out)
    assert model.stem_factor == 4
    with torch.no_grad():
        x = fn._to_input(images)
        k, c, n = model(x)
        feats = model.features(x).double().numpy()
    np.testing.assert_allclose(pred.kinds, torch.sigmoid(k).double().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pred.colours, torch.sigmoid(c).double().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pred.count, torch.softmax(n, 1).double().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pred.count.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(net.features(images), feats, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(pred.predicted_count(), n.argmax(1).numpy() + 1)
    # batching does not change the predictions; wrong sizes are refused like features()
    np.testing.assert_allclose(net.predict(images, batch=256).kinds, pred.kinds, atol=1e-6)
    with pytest.raises(UserError, match="128x128"):
        net.predict(make_images(99, 2, resolution=32))
    # the whole path: real captions through the net (an untrained net: only the bookkeeping is checked)
    prompts = [caption(make_example(99, i, 128)[1]) for i in range(6)]
    acc = prompt_accuracy(net, images, prompts)
    assert acc.n == 6 and 0.0 <= acc.exact <= min(acc.kinds, acc.colours, acc.count) <= 1.0


def test_resolution_must_be_a_multiple_of_32():
    assert fn.stem_factor(32) == 1 and fn.stem_factor(128) == 4
    for bad in (16, 48, 100):
        with pytest.raises(UserError, match="multiple of 32"):
            fn.stem_factor(bad)


def test_32px_architecture_and_export_unchanged(tmp_path):
    """The default 32x32 net has no stem (same parameters and keys as the committed weights) and its
    default export has the features output only."""
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    net = fn.FeatureCNN()
    committed = load_file(str(FEATURENET_DIR / "featurenet.safetensors"))
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: v.shape for k, v in committed.items()}
    small = fn.FeatureCNN(widths=(8, 16), depths=(1, 1))
    fn.export_onnx(small, tmp_path / "featurenet.onnx")
    assert [o.name for o in onnx.load(str(tmp_path / "featurenet.onnx")).graph.output] == ["features"]


# --------------------------------------------------------------------------- the committed 32x32 nets

# features of make_images(4321, 3) by the committed export/featurenet ONNX (sha256 9dde8d86...), computed
# when the heads were added: the sum per image and the first six values of each
OLD_SUMS = [81.82661, 75.61534, 76.87606]
OLD_FIRST6 = [[0.0, 0.0, 0.26521, 0.2051, 1.38492, 0.05238],
              [0.01626, 0.82769, 1.84855, 0.34638, 0.08174, 0.77709],
              [5.23716, 0.00335, 0.06695, 1.53336, 0.12132, 0.0]]


def test_old_featurenet_features_unchanged():
    net = FeatureNet(FEATURENET_DIR)
    assert net.sha256.startswith("9dde8d864e05") and not net.has_heads and net.dim == 128
    images = make_images(4321, 3)
    got = net.features(images)
    np.testing.assert_allclose(got.sum(1), OLD_SUMS, atol=2e-4, rtol=0)
    np.testing.assert_allclose(got[:, :6], OLD_FIRST6, atol=2e-5, rtol=0)
    model = fn.load_torch(FEATURENET_DIR)
    with torch.no_grad():
        want = model.features(fn._to_input(images)).double().numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("folder", [FEATURENET_DIR, EVALNET_DIR])
def test_net_without_heads_refuses_prompt_accuracy(folder):
    net = FeatureNet(folder)
    assert not net.has_heads
    images = make_images(4321, 2)
    prompts = [caption(make_example(4321, i)[1]) for i in range(2)]
    with pytest.raises(UserError, match="no prediction heads") as e:
        prompt_accuracy(net, images, prompts)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(UserError, match="no prediction heads"):
        net.predict(images)


# --------------------------------------------------------------------------- prompt accuracy

LABELS = {"kinds": list(KINDS), "colours": list(COLOUR_NAMES)}   # a net's config.json 'labels'


def _onehot(n, on):
    v = np.full(n, 0.1)
    v[list(on)] = 0.9
    return v


def test_prompt_accuracy_on_hand_made_predictions():
    # "two red circles and a blue triangle": kinds circle(0) + triangle(2), colours red(0) + blue(2), count 3
    prompt = "two red circles and a blue triangle"
    t = parse_caption(prompt)
    assert t.count == 3
    kinds_ok, kinds_extra = _onehot(5, [0, 2]), _onehot(5, [0, 1, 2])
    colours_ok, colours_bad = _onehot(8, [0, 2]), _onehot(8, [0])
    count3, count2 = np.array([0.1, 0.2, 0.7]), np.array([0.1, 0.6, 0.3])
    pred = HeadPredictions(
        kinds=np.stack([kinds_ok, kinds_ok, kinds_extra, kinds_extra]),
        colours=np.stack([colours_ok, colours_ok, colours_ok, colours_bad]),
        count=np.stack([count3, count2, count3, count2]))
    # image 0 all right; 1 kinds + colours right, count wrong; 2 colours + count right, an extra kind; 3 all wrong
    acc = score_prompts(pred, [prompt] * 4, LABELS)
    assert acc.n == 4
    assert acc.exact == 0.25 and acc.kinds == 0.5 and acc.colours == 0.75 and acc.count == 0.5
    np.testing.assert_array_equal(acc.per_image, [True, False, False, False])
    assert 0.0 <= acc.exact_ci[0] <= acc.exact <= acc.exact_ci[1] <= 1.0 and acc.exact_ci[0] < acc.exact_ci[1]
    # targets may be passed in instead of captions: the same result
    assert score_prompts(pred, [t] * 4) == acc
    # colours match and count does not: not an exact match
    only = score_prompts(HeadPredictions(pred.kinds[1:2], pred.colours[1:2], pred.count[1:2]), [prompt], LABELS)
    assert only.colours == 1.0 and only.kinds == 1.0 and only.count == 0.0 and only.exact == 0.0
    assert only.exact_ci == (0.0, 0.0)
    # a probability of exactly 0.5 is "absent"
    half = kinds_ok.copy()
    half[2] = 0.5
    assert score_prompts(HeadPredictions(half[None], colours_ok[None], count3[None]), [prompt], LABELS).kinds == 0.0
    d = acc.as_dict()
    assert d["exact"] == 0.25 and d["n"] == 4 and len(d["exact_ci95"]) == 2


def test_prompt_accuracy_oracle_on_generator_labels():
    """Predictions made from the examples' own labels match their captions exactly (label orders agree)."""
    labels = [make_example(2024, i, 32)[1] for i in range(40)]
    prompts = [caption(lab) for lab in labels]
    count = np.zeros((40, 3))
    count[np.arange(40), [lab.count - 1 for lab in labels]] = 1.0
    pred = HeadPredictions(np.stack([lab.kinds * 0.98 + 0.01 for lab in labels]),
                           np.stack([lab.colours * 0.98 + 0.01 for lab in labels]), count)
    acc = score_prompts(pred, prompts, LABELS)
    assert acc.exact == acc.kinds == acc.colours == acc.count == 1.0 and acc.exact_ci == (1.0, 1.0)
    # shift every count by one: only the count (and so the exact match) fails
    wrong = score_prompts(HeadPredictions(pred.kinds, pred.colours, np.roll(count, 1, axis=1)), prompts, LABELS)
    assert wrong.exact == 0.0 and wrong.count == 0.0 and wrong.kinds == 1.0 and wrong.colours == 1.0


def test_prompt_accuracy_bootstrap_ci():
    n, hits = 1000, 700
    t = parse_caption("a red circle")
    good = HeadPredictions(_onehot(5, [0])[None], _onehot(8, [0])[None], np.array([[0.8, 0.1, 0.1]]))
    bad = HeadPredictions(_onehot(5, [1])[None], _onehot(8, [0])[None], np.array([[0.8, 0.1, 0.1]]))
    pred = HeadPredictions(*(np.concatenate([np.repeat(g, hits, 0), np.repeat(b, n - hits, 0)])
                             for g, b in zip(good[:3], bad[:3])))
    acc = score_prompts(pred, [t] * n, seed=3)
    lo, hi = acc.exact_ci
    assert acc.exact == 0.7 and lo < 0.7 < hi
    half_width = 1.96 * np.sqrt(0.7 * 0.3 / n)   # normal approximation, ~0.028
    assert abs((hi - lo) / 2 - half_width) < 0.006
    assert score_prompts(pred, [t] * n, seed=3).exact_ci == acc.exact_ci   # deterministic


def test_prompt_accuracy_refusals():
    class Stub:
        labels = LABELS

        def predict(self, images, batch=256):
            n = len(images)
            return HeadPredictions(np.full((n, 5), 0.1), np.full((n, 8), 0.1), np.tile([0.9, 0.05, 0.05], (n, 1)))

    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(UserError, match="2 images .* 3 prompts"):
        prompt_accuracy(Stub(), images, ["a red circle"] * 3)
    with pytest.raises(UserError, match="not '<number> <colour> <kind>'"):
        prompt_accuracy(Stub(), images, ["a red circle", "a purple blob"])
    with pytest.raises(UserError, match="at least one"):
        prompt_accuracy(Stub(), images[:0], [])
    with pytest.raises(UserError, match="labels"):
        score_prompts(Stub().predict(images), ["a red circle"] * 2, labels={"kinds": ["square", "circle"]})
    assert prompt_accuracy(Stub(), images, ["a red circle"] * 2).exact == 0.0
