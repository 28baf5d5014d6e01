"""resnet_jax: residual networks and their plain twins, trained with SGD in JAX/Flax."""
