"""Data: the shard format (``shards``), the training stream (``loader``), ImageNet-style input reading
(``imagenet``) and the embedded MNIST sets (``demo``). Import the submodules directly; this package
imports nothing heavy."""
