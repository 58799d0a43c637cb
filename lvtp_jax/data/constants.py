"""Normalisation constants of the pretrained checkpoints (timm's names)."""

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)   # DeiT, most torchvision models
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)       # AugReg ViT: inputs in [-1, 1]
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
