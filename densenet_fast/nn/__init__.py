from densenet_fast.nn.dense_block import DenseBlock, DenseLayer, Transition
from densenet_fast.nn.squeeze_excite import SqueezeExcite

__all__ = ["DenseBlock", "DenseLayer", "Transition", "SqueezeExcite"]
