"""Dense-prediction backbones (issue 26): layers with a convolution choice and
torch-semantics normalisation (:mod:`.layers`), ResNet-18/34/50 with the
dilated output-stride-8 variant and LibMTL's DeepLab ASPP head
(:mod:`.resnet`). Flax linen modules used as pure functions:
``variables = module.init(rng, x)``, then
``module.apply(variables, x, train=True, mutable=["batch_stats"])`` in
training, ``module.apply(variables, x, train=False)`` in evaluation."""
