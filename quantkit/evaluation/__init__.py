"""Evaluation that needs no download: a digit classifier trained by quantkit, and generator metrics built on it."""
from .classifier import DigitClassifier, frechet_distance, load_or_train_classifier, train_digit_classifier

__all__ = ["DigitClassifier", "frechet_distance", "load_or_train_classifier", "train_digit_classifier"]
