"""Depth completion, its own training task beside distillation (`run.task: completion`): a completion network
trained on top of a frozen mono model, fed its LiDAR-aligned depth, the image and the sparse points.

Origin: the two-stage pipeline of the label-free geometric KD paper (relative depth -> alignment to sparse depth ->
completion guided by RGB and the aligned depth); the network is `distill.models.completion.CompletionNet`.
"""
