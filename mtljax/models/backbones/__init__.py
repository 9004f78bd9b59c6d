"""Dense-prediction backbones (issue 26): layers with a convolution choice and
torch-semantics normalisation (:mod:`.layers`), ResNet-18/34/50 with LibMTL's
dilated output-stride-8 variant and its DeepLab ASPP head (:mod:`.resnet`),
and a Vision Transformer in Hugging Face's ``ViTModel`` layout (:mod:`.vit`).
Flax linen modules used as pure functions:
``variables = module.init(rng, x)``, then
``module.apply(variables, x, train=True, mutable=["batch_stats"])`` in
training, ``module.apply(variables, x, train=False)`` in evaluation.
Torchvision weights: :mod:`mtljax.pretrained`."""

from mtljax.models.backbones.layers import (
    BatchNorm, Conv, GroupNorm, conv2d, norm_layer, resize_bilinear, resolve_conv_impl)
from mtljax.models.backbones.resnet import STAGES, DeepLabHead, ResNet
from mtljax.models.backbones.vit import ViT

__all__ = ["BatchNorm", "Conv", "GroupNorm", "conv2d", "norm_layer", "resize_bilinear",
           "resolve_conv_impl", "STAGES", "DeepLabHead", "ResNet", "ViT"]
