"""Sliding-window inference with compressed engines over whole 2D / 3D images."""

from efficientbioai.infer.pipeline import InferResult, infer, open_engine, open_original
from efficientbioai.infer.predict import Prediction, Predictor

__all__ = ["InferResult", "Prediction", "Predictor", "infer", "open_engine", "open_original"]
