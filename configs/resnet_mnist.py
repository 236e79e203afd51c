"""ResNet-20 (He et al. 2016's CIFAR family) with ghost batch norm on MNIST.

    python -m scaling.main --config=configs/resnet_mnist.py --workdir=runs/resnet_mnist
    python -m scaling.main --config=configs/resnet_mnist.py --workdir=runs/x --config.model.depth=32

Ghost batches of 16 (Hoffer et al. use 128 at ImageNet batch sizes): the ghost size must divide
each device's microbatch, batch_size / (grad_groups rounded up to the device count): 64, 32 or 16
examples on 1, 2-4 or 8 devices, so this config runs unchanged on any of them, with the same BN
statistics. Raise both with the batch size (e.g. batch 1024, ghost 128). 2 gradient groups, one
step per dispatch: on CPU the microbatches and the chunk's steps are unrolled (convolutions in
loops are ~10x slower there), and 8 groups x 2 steps of ResNet-20 took 3.5 minutes to compile.
Light augmentation: random crops with 2 pixels of padding, no flips (digits are not symmetric).
Expected: under 1% validation error within 2 epochs; on a 2-core CPU a step takes ~1.1 s (measured
on Fashion-MNIST, configs/resnet_fashion_mnist.py, at load ~2: 114 examples/s).
"""
from configs import mnist


def get_config():
  c = mnist.get_config()
  c.model.name = "resnet"
  c.model.depth = 20          # 6n + 2: 20, 32, 44, 56, 110
  c.model.width = 16          # channels of the first stage (then 2x, 4x)
  c.model.ghost_batch_size = 16
  c.batch_size, c.grad_groups = 128, 2
  c.base_lr, c.reference_batch_size = 0.1, 128
  c.optimizer.weight_decay = 5e-4
  c.augment.crop_padding, c.augment.flip = 2, False
  c.budget.length, c.budget.unit = 2.0, "epochs"
  c.warmup.length, c.warmup.unit = 0.25, "epochs"
  c.eval_every.length = 0.25
  c.chunk_steps, c.chunk_unroll = 1, True
  return c
