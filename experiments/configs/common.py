"""Fields every experiment config has; each config file overrides what it needs.

Every key here has a rule in `experiments/recipe.py`'s SCHEMA (type, range,
finiteness), checked before a run touches its workdir; a key without one fails
tests/experiments/test_guards.py. Add the rule with the key.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "lenet"
  # The model's own options (`models.get_model`), e.g. LeNet's CPU speed-ups.
  c.model_kwargs = ml_collections.ConfigDict()
  c.dtype = "float32"  # computation dtype; params stay float32
  c.seed = 0
  c.distributed = False  # call jax.distributed.initialize() (multi-host runs)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.manual_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.dataset.augment = False
  c.dataset.image_size = 224  # imagenet2012 only: images are resized to this square
  # imagenet2012 only: worker processes that decode the JPEGs; None = one per
  # CPU, 0 = decode in the training process (e.g. under a debugger).
  c.dataset.workers = ml_collections.FieldReference(None, field_type=int)

  c.batch_size = 128       # global, split over all devices
  c.eval_batch_size = 500

  # SGD with momentum; weight decay is part of the loss E (paper Sec. 2.3).
  c.optimizer = "sgd"      # sgd | adam (AdamW)
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4

  # Every stage's `epochs` (fractions allowed): the baseline's, each pruning
  # step's, each INQ phase's (the last phase's is `inq.final_finetune_epochs`).

  # Stage 1: the full-precision model, trained here or restored.
  c.baseline = stage_schedule(epochs=10, learning_rate=0.05)
  c.init_checkpoint = ml_collections.FieldReference(None, field_type=str)   # orbax dir
  c.init_torchvision = ml_collections.FieldReference(None, field_type=str)  # .pth/.safetensors

  # Stage 2: INQ. The learning-rate schedule restarts every phase.
  c.inq = stage_schedule(epochs=2, learning_rate=0.01)
  c.inq.bits = 5
  c.inq.portions = (0.5, 0.75, 0.875, 1.0)
  c.inq.strategy = "magnitude"  # magnitude (pruning-inspired) | random
  c.inq.granularity = "layer"   # layer (paper) | channel
  c.inq.calibration = "absmax"  # absmax: n1 from max |w| (paper) | mse: least rounding error
  c.inq.include = r"(^|/)kernel$"
  c.inq.exclude = ml_collections.FieldReference(None, field_type=str)
  c.inq.carry_optimizer_state = False  # the paper restarts the optimizer every step
  c.inq.final_finetune_epochs = 0.0    # train biases/BN with every kernel frozen
  # Low-bit options beyond the paper (issue #32); all off by default, which is
  # the paper's algorithm.
  # Per-layer bit widths: ((regex, bits), ...) over '/'-joined param paths, the
  # first match wins, `bits` for the rest; e.g. (("^conv1/", 8), ("^fc2/", 8)).
  c.inq.layer_bits = ()
  # Distillation from the run's own fp32 baseline in every INQ phase and the
  # final finetune: loss = (1 - a) CE(labels) + a T^2 KL(teacher_T || student_T),
  # a = distill_weight (0 = off), T = distill_temperature.
  c.inq.distill_weight = 0.0
  c.inq.distill_temperature = 4.0
  # Re-estimate the BatchNorm statistics from this many train batches (train
  # mode, no gradient) right after each quantization step; 0 = off.
  c.inq.bn_reestimate_batches = 0

  # Optional stage between the two: iterative magnitude pruning with retraining
  # (inq_jax.prune); INQ then quantizes the unpruned weights, zeros stay frozen.
  c.prune = stage_schedule(epochs=1, learning_rate=0.01)
  c.prune.sparsity = ()    # ((regex, fraction), ...), first match wins; () = no pruning
  c.prune.steps = 3
  c.prune.schedule = "cubic"  # cubic (Zhu & Gupta) | linear ramp to the target

  c.max_checkpoints_to_keep = 2
  c.plot_layer = ""  # regex for weights.png; "" = the largest quantized layer
  return c


def stage_schedule(epochs: float, learning_rate: float) -> ml_collections.ConfigDict:
  """A stage's epochs and learning-rate schedule (restarted at every stage/phase)."""
  c = ml_collections.ConfigDict()
  c.epochs = float(epochs)  # fractions allowed (e.g. 0.4 epochs per phase)
  c.learning_rate = learning_rate
  c.lr_schedule = "cosine"  # cosine | step (x step_factor every step_epochs) | constant
  c.step_epochs = 1.0
  c.step_factor = 0.1
  c.warmup_epochs = 0.0
  return c
