"""Inference: depth from images with a torch model (`predict_depth`) or an exported one (depth_node's engine), and
the evaluation loop that scores a predictor over a dataset (`evaluate`).

`open_predictor(ref)` is the one way the verbs (eval, viz, report, demo) get something that predicts depth: an
exported .onnx / TensorRT engine, or anything `distill.models.load_model` accepts.
"""

from distill.inference.evaluate import evaluate, paste_into_full
from distill.inference.predict import predict_depth
from distill.inference.predictors import Predictor, engine_predictor, model_predictor, open_predictor

__all__ = [
    "Predictor",
    "engine_predictor",
    "evaluate",
    "model_predictor",
    "open_predictor",
    "paste_into_full",
    "predict_depth",
]
