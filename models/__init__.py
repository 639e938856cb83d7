"""Model families registered under `cswap.models` (timm style: a family's file holds its
models and their builders): CIFAR-style ResNets, a small MobileNetV2, dense torchvision
detectors, mmsegmentation segmentors. Installed as `cswap.models`."""
