"""Evaluation: the Frechet distance, class-matched reference sets, the digit classifier, and the generator report."""
import numpy as np
import pytest
import torch

from quantkit.evaluation import frechet_distance
from quantkit.evaluation.classifier import ClassifierConfig, DigitClassifier, load_or_train_classifier
from quantkit.evaluation.generation import class_matched_subset


def _scipy_frechet(a, b):
    from scipy import linalg

    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(mu @ mu + np.trace(ca + cb - 2 * covmean))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(0).normal(size=(200, 8))
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    a = np.random.default_rng(0).normal(size=(300, 6))
    shift = np.arange(6) / 3
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_distance_matches_the_matrix_square_root_formula_and_is_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(300, 5)) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)


def test_frechet_distance_refuses_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_class_matched_subset_has_the_class_counts_of_the_reference():
    labels = torch.arange(10).repeat(20)
    like = torch.tensor([0, 0, 3, 5, 5, 5, 9])
    idx = class_matched_subset(labels, like, seed=0)
    assert torch.equal(labels[idx].sort().values, like.sort().values)
    with pytest.raises(ValueError, match="class 1"):
        class_matched_subset(torch.tensor([0, 0, 1]), torch.tensor([1, 1]))


def test_classifier_features_and_labels_have_the_documented_shapes():
    model = DigitClassifier(ClassifierConfig())
    labels, feats = model.predict(torch.rand(5, 1, 16, 16))
    assert labels.shape == (5,) and labels.dtype == torch.long
    assert feats.shape == (5, 64) and feats.dtype == torch.float64


def test_classifier_learns_real_digits_and_is_cached(tmp_path):
    cfg = ClassifierConfig(epochs=2)
    model, acc = load_or_train_classifier(tmp_path, cfg)
    assert acc > 0.6  # two epochs; the full recipe reaches ~98% (reported by the benchmark)
    again, acc2 = load_or_train_classifier(tmp_path, cfg)  # read back, not retrained
    assert acc2 == acc
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(model.predict(x)[0], again.predict(x)[0])


def test_evaluate_generator_reports_every_number(tmp_path):
    from quantkit.evaluation.generation import evaluate_generator, reference_sets
    from quantkit.generators import create_generator
    from quantkit.tokenizers import create_tokenizer

    tok = create_tokenizer("vqvae", hidden=8, res_hidden=4, embed_dim=2, num_res_blocks=1, quantizer="fsq",
                           quantizer_kwargs={"levels": [4, 4]}).eval()
    clf = DigitClassifier(ClassifierConfig()).eval()
    refs = reference_sets(tok, clf)
    assert refs.test_labels.shape[0] == refs.test_features.shape[0] == 360
    gen = create_generator("maskgit", vocab_size=tok.vocab_size, token_shape=tok.token_shape, dim=16, depth=1,
                           heads=2)
    report = evaluate_generator(gen, tok, clf, refs, steps=2)
    assert 0 <= report["conditional_accuracy"] <= 1
    assert report["frechet_distance"] >= 0 and report["images_per_second"] > 0
    assert report["evaluations_per_image"] == 2


def test_evaluation_averages_the_draws_it_reports():
    from quantkit.evaluation.generation import evaluate_generator, reference_sets
    from quantkit.generators import create_generator
    from quantkit.tokenizers import create_tokenizer

    tok = create_tokenizer("vqvae", hidden=8, res_hidden=4, embed_dim=2, num_res_blocks=1, quantizer="fsq",
                           quantizer_kwargs={"levels": [4, 4]}).eval()
    clf = DigitClassifier(ClassifierConfig()).eval()
    one, other, both = (reference_sets(tok, clf, seed=s, draws=d) for s, d in ((0, 1), (1, 1), (0, 2)))
    assert both.floor_fd == pytest.approx((one.floor_fd + other.floor_fd) / 2)
    assert both.floor_fd_std == pytest.approx(abs(one.floor_fd - other.floor_fd) / 2)
    gen = create_generator("maskgit", vocab_size=tok.vocab_size, token_shape=tok.token_shape, dim=16, depth=1,
                           heads=2)
    first, second = (evaluate_generator(gen, tok, clf, both, steps=2, seed=s, draws=1) for s in (5, 6))
    mean = evaluate_generator(gen, tok, clf, both, steps=2, seed=5, draws=2)
    assert first["frechet_distance"] != second["frechet_distance"]  # the draws differ
    assert mean["frechet_distance"] == pytest.approx((first["frechet_distance"] + second["frechet_distance"]) / 2)
    assert mean["conditional_accuracy"] == pytest.approx(
        (first["conditional_accuracy"] + second["conditional_accuracy"]) / 2)
    assert mean["draws"] == 2 and mean["frechet_distance_std"] > 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="draws"):
            evaluate_generator(gen, tok, clf, both, steps=2, draws=bad)
        with pytest.raises(ValueError, match="draws"):
            reference_sets(tok, clf, draws=bad)


def _row(name, guidance, accuracy, ratio):
    return {"generator": name, "guidance": guidance, "conditional_accuracy": accuracy, "fd_over_floor": ratio}


def test_best_rows_picks_the_lowest_fd_over_floor_among_rows_that_reach_the_accuracy():
    from quantkit.evaluation.generation import best_rows

    rows = [_row("maskgit", 0.0, 0.85, 1.5), _row("maskgit", 0.5, 0.95, 2.5), _row("maskgit", 1.0, 0.99, 3.0),
            _row("var", 0.0, 0.5, 4.0), _row("var", 1.0, 0.6, 3.0)]
    best = best_rows(rows)
    assert list(best) == ["maskgit", "var"]
    assert best["maskgit"]["guidance"] == 0.5  # 0.0 has the lower ratio but misses 90% accuracy
    assert best["var"]["guidance"] == 1.0  # none reaches 90%: the lowest ratio overall
    assert best_rows(rows, min_accuracy=0.8)["maskgit"]["guidance"] == 0.0
    with pytest.raises(ValueError, match="no evaluation rows"):
        best_rows([])
