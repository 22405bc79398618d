import numpy as np
import pytest

from nakt.fusion import (
    FUSIONS,
    fuse,
    fuse_trimmed_vote,
    fuse_vote,
    outlier_teacher,
    sharpen,
    staple_estimates,
    staple_weights,
    teacher_agreement,
)


def _probs(k=3, c=3, shape=(6, 7), seed=0):
    p = np.random.default_rng(seed).random((k, c, *shape))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_every_rule_shape_sum_and_single_teacher(name):
    probs = _probs()
    fused = FUSIONS[name](probs, np.array([1.0, 2.0, 3.0]))
    assert fused.shape == probs.shape[1:]
    np.testing.assert_allclose(fused.sum(0), 1, atol=1e-6)
    single = FUSIONS[name](probs[:1], None)
    if name in ("mean", "weighted", "staple-weighted", "confidence"):  # soft rules keep a lone teacher's answer
        np.testing.assert_allclose(single, probs[0])
    else:  # hard rules give the teacher's argmax, one-hot
        np.testing.assert_array_equal(single.argmax(0), probs[0].argmax(0))
        assert set(np.unique(single)) <= {0.0, 1.0}


def test_mean_and_weighted_known_answers():
    probs = np.array([[[0.9], [0.1]], [[0.3], [0.7]]])  # K=2, C=2, one pixel
    np.testing.assert_allclose(fuse(probs, "mean")[:, 0], [0.6, 0.4])
    np.testing.assert_allclose(fuse(probs, "weighted", [3, 1])[:, 0], [0.75, 0.25])


def test_vote_majority_and_tie_rule():
    # pixel 0: two of three teachers say class 1; pixel 1: a 1-1 tie between classes 0 and 2 (third says 1)
    probs = np.array([
        [[0.2, 0.6], [0.8, 0.1], [0.0, 0.3]],
        [[0.1, 0.2], [0.9, 0.7], [0.0, 0.1]],
        [[0.9, 0.1], [0.1, 0.2], [0.0, 0.7]],
    ])  # [K=3, C=3, 2 pixels]: argmax per teacher: pixel0 -> 1, 1, 0; pixel1 -> 0, 1, 2
    fused = fuse_vote(probs)
    assert fused[:, 0].tolist() == [0, 1, 0]
    # pixel 1 is a three-way tie; the highest mean probability decides: class 2 (0.37 vs 0.30 and 0.33)
    assert fused[:, 1].tolist() == [0, 0, 1]
    two = np.array([[[1.0], [0.0]], [[0.4], [0.6]]])  # a 1-1 tie between two teachers
    assert fuse_vote(two)[:, 0].tolist() == [1, 0]  # mean probs 0.7 vs 0.3: class 0 wins


def test_staple_recovers_truth_and_ranks_raters():
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 40), int)
    truth[10:30, 12:28] = 1
    raters = []
    for flip in (0.0, 0.02, 0.25):  # a perfect, a good and a poor rater
        noisy = np.where(rng.random(truth.shape) < flip, 1 - truth, truth)
        raters.append(np.stack([1 - noisy, noisy]).astype(float))
    fused, quality = staple_estimates(np.stack(raters))
    assert (fused.argmax(0) == truth).mean() > 0.99
    sens = quality["sensitivity"]
    assert sens[0] > sens[2] and sens[1] > sens[2]
    assert teacher_agreement(np.stack(raters))["pairwise_dice"] < 1.0


def test_teacher_weights_from_validation_scores(tmp_path):
    from nakt.io.rundir import write_metrics
    from nakt.label import teacher_weights

    runs = []
    for i, dice in enumerate([0.95, 0.90]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "config.json").write_text("{}")
        write_metrics(tmp_path / f"r{i}", {"best_val_dice": dice})
        runs.append(str(tmp_path / f"r{i}"))
    assert teacher_weights(runs)[0] == pytest.approx([0.95, 0.90])
    assert teacher_weights(runs, weighting="inverse-error")[0] == pytest.approx([20.0, 10.0])
    assert teacher_weights(runs, weights=[1, 3])[0] == [1.0, 3.0]


def _raters(seed: int = 0):
    """A perfect, a good and a poor rater of one square (soft: 0.9 on their label), and the truth."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40), int)
    truth[10:30, 12:28] = 1
    raters = []
    for flip in (0.0, 0.02, 0.3):
        noisy = np.where(rng.random(truth.shape) < flip, 1 - truth, truth)
        raters.append(np.stack([1 - noisy, noisy]) * 0.8 + 0.1)
    return np.stack(raters), truth


def test_staple_weighted_trusts_the_raters_staple_finds_reliable():
    probs, truth = _raters()
    weights = staple_weights(staple_estimates(probs)[1])
    assert weights[0] > weights[2] and weights[1] > weights[2]
    fused = fuse(probs, "staple-weighted")
    assert (fused.argmax(0) == truth).mean() >= (fuse(probs, "mean").argmax(0) == truth).mean()
    assert 0 < fused.min() and fused.max() < 1  # soft, unlike STAPLE's own estimate
    np.testing.assert_allclose(fused, fuse(probs, "weighted", weights))


def test_confidence_lets_a_sure_teacher_outweigh_unsure_ones_pixel_by_pixel():
    sure, unsure = [[0.02, 0.5], [0.98, 0.5]], [[0.8, 0.02], [0.2, 0.98]]  # [C=2, 2 pixels]
    probs = np.array([sure, unsure, unsure])
    mean, confident = fuse(probs, "mean"), fuse(probs, "confidence")
    assert mean[:, 0].argmax() == 0 and confident[:, 0].argmax() == 1  # pixel 0: the sure teacher wins
    assert confident[1, 1] > mean[1, 1]  # pixel 1: the other way round, the unsure teacher yields
    np.testing.assert_allclose(confident.sum(0), 1)


def test_sharpen_keeps_the_argmax_and_moves_towards_it():
    probs = _probs(k=1)[0]
    for temperature in (0.5, 2.0):
        out = sharpen(probs, temperature)
        np.testing.assert_array_equal(out.argmax(0), probs.argmax(0))
        np.testing.assert_allclose(out.sum(0), 1, atol=1e-6)
        assert (out.max(0) > probs.max(0)).all() if temperature < 1 else (out.max(0) < probs.max(0)).all()
    assert sharpen(probs, 1.0) is probs


def test_trimmed_vote_drops_the_teacher_the_others_contradict():
    truth = np.zeros((20, 20), int)
    truth[5:15, 5:15] = 1
    good = truth.copy()
    good[5, 5:15] = 0  # misses one row
    poor = np.zeros_like(truth)
    poor[3:17, 3:17] = 1  # the others' lesion grown by two pixels
    one_hot = [np.stack([1 - m, m]).astype(float) for m in (truth, good, poor)]
    probs = np.stack(one_hot)  # [K=3, C=2, 20, 20]
    assert outlier_teacher(probs) == 2
    # the plain vote takes the row the good teacher misses from the poor one; the trimmed vote asks the two kept
    # teachers, who tie there, and their mean probability (0.5 / 0.5) goes to the lower class index, background
    assert fuse_vote(probs)[1, 5, 5] == 1
    assert fuse_trimmed_vote(probs)[1, 5, 5] == 0
    assert (fuse_trimmed_vote(probs)[1] == good).all()
    assert outlier_teacher(probs[:2]) is None  # two teachers: no odd one out
    assert outlier_teacher(np.stack([one_hot[0]] * 3)) is None  # all agree: a tie, nobody dropped
    np.testing.assert_array_equal(fuse_trimmed_vote(np.stack([one_hot[0]] * 3)), one_hot[0])


def test_pairwise_dice_equals_the_dice_of_each_pair_and_class():
    """The vectorised pairwise Dice (all pairs by matrix products, chunked) against a plain per-pair,
    per-class count, on random 3D maps with a class some maps lack, over several chunk sizes."""
    from nakt.fusion import pairwise_dice

    rng = np.random.default_rng(0)
    hard = rng.integers(0, 3, size=(4, 6, 7, 5))
    hard[1][hard[1] == 2] = 0  # teacher 1 never labels class 2
    expected = np.ones((4, 4))
    for a in range(4):
        for b in range(4):
            if a != b:
                per_class = []
                for j in (1, 2, 3):
                    fa, fb = hard[a] == j, hard[b] == j
                    total = fa.sum() + fb.sum()
                    per_class.append(1.0 if total == 0 else 2 * (fa & fb).sum() / total)
                expected[a, b] = np.mean(per_class)
    for chunk in (7, 64, 1 << 22):
        np.testing.assert_allclose(pairwise_dice(hard, 4, chunk=chunk), expected, atol=1e-12)


@pytest.mark.parametrize("classes", [2, 3])
def test_hard_labels_are_argmax_in_uint8(classes):
    """`hard_labels` is `np.argmax` exactly (first maximum on ties, a NaN wins) in uint8, on either axis."""
    from nakt.fusion import hard_labels
    from nakt.preprocess import decode_labels

    rng = np.random.default_rng(classes)
    probs = np.round(rng.random((3, classes, 6, 5)) * 4).astype(np.float32) / 4  # many exact ties
    probs[0, 1, :2, :2], probs[1, 0, 0, :3], probs[2, :, 5, 4] = np.nan, np.nan, np.nan
    for axis, array in ((1, probs), (0, probs[0])):
        hard = hard_labels(array, axis)
        assert hard.dtype == np.uint8 and np.array_equal(hard, array.argmax(axis))
    assert decode_labels(hard_labels(probs[1], 0), [0, 255, 7][:classes]).dtype == np.uint8
