"""jaxedit: a JAX/TPU-native trainer for instruction-based image editing with RL."""

__version__ = "0.1.0"
