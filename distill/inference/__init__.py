"""Inference: depth from images with a torch model (`predict_depth`) or an exported one (depth_node's engine).

`open_predictor(ref)` is the one way the verbs (eval, viz, report, demo) get something that predicts depth: an
exported .onnx / TensorRT engine, or anything `distill.models.load_model` accepts.
"""

from distill.inference.predict import predict_depth
from distill.inference.predictors import Predictor, engine_predictor, model_predictor, open_predictor

__all__ = ["Predictor", "engine_predictor", "model_predictor", "open_predictor", "predict_depth"]
