"""ResNet-20 with ghost batch norm on Fashion-MNIST (Shallue et al.'s second image workload).

    sudo apt-get install dataset-fashion-mnist     # the four upstream .gz files, once
    python -m scaling.main --config=configs/resnet_fashion_mnist.py --workdir=runs/resnet_fashion

As configs/resnet_mnist.py (ghost batches of 16, so 1 to 8 devices run it unchanged), plus
left-right flips: clothes stay clothes in a mirror. Target 8% validation error.
"""
from configs import resnet_mnist


def get_config():
  c = resnet_mnist.get_config()
  c.dataset.name = "fashion_mnist"
  c.augment.crop_padding, c.augment.flip = 2, True
  c.budget.length = 5.0
  c.target.value = 0.08
  return c
