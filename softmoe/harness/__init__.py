"""The experiment harness: data, training loop, logging and checkpoints around the ``softmoe`` library.

Unlike the library, the harness depends on Hydra/OmegaConf, torchvision and W&B; ``import softmoe``
never imports it.
"""
