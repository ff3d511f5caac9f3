"""The paper's networks in Flax Linen (`cnn`, `lenet`, `resnet`, built from `layers`) and the
torchvision importer (`pretrained`)."""

from experiments.models.cnn import *  # noqa: F401,F403  (get_model, init_variables, the nets)
