from densenet_fast.nn.dense_block import DenseBlock, DenseLayer, Transition

__all__ = ["DenseBlock", "DenseLayer", "Transition"]
